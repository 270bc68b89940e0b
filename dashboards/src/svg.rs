//! Hand-written inline SVG charts (no scripts, no external resources): line
//! charts over time and grouped bar charts.

use std::fmt::Write as _;

/// Series colours, in order.
pub const PALETTE: [&str; 10] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

const W: f64 = 760.0;
const H: f64 = 300.0;
const L: f64 = 64.0;
const R: f64 = 16.0;
const T: f64 = 34.0;
const B: f64 = 42.0;

/// Escape text for HTML and SVG.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A line series: name and `(x, y)` points.
#[derive(Debug, Clone)]
pub struct Line {
    /// Legend name.
    pub name: String,
    /// Points, x increasing.
    pub points: Vec<(f64, f64)>,
}

/// Average a series into at most `n` buckets of equal x width (keeps charts light).
pub fn downsample(points: &[(f64, f64)], n: usize) -> Vec<(f64, f64)> {
    if points.len() <= n || n == 0 {
        return points.to_vec();
    }
    let per = points.len().div_ceil(n);
    points
        .chunks(per)
        .map(|c| {
            let k = c.len() as f64;
            (c.iter().map(|p| p.0).sum::<f64>() / k, c.iter().map(|p| p.1).sum::<f64>() / k)
        })
        .collect()
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn frame(s: &mut String, id: &str, title: &str, y_label: &str, y_min: f64, y_max: f64) {
    let _ = write!(
        s,
        r##"<svg id="{id}" class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img"><title>{t}</title><rect x="0" y="0" width="{W}" height="{H}" fill="#fff"/><text x="{L}" y="20" font-size="14" font-weight="bold">{t}</text><text x="14" y="{ym}" font-size="11" transform="rotate(-90 14 {ym})" text-anchor="middle">{yl}</text>"##,
        t = esc(title),
        yl = esc(y_label),
        ym = T + (H - T - B) / 2.0
    );
    for k in 0..=4 {
        let v = y_min + (y_max - y_min) * f64::from(k) / 4.0;
        let y = H - B - (H - T - B) * f64::from(k) / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{L}" x2="{x2}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{tx}" y="{ty:.1}" font-size="10" text-anchor="end">{v}</text>"##,
            x2 = W - R,
            tx = L - 4.0,
            ty = y + 3.0,
            v = tick(v)
        );
    }
}

fn legend(s: &mut String, title: &str, names: &[String]) {
    let mut x = L + 20.0 + 8.5 * title.chars().count() as f64;
    for (i, n) in names.iter().enumerate().take(PALETTE.len()) {
        let _ = write!(
            s,
            r#"<rect x="{x:.0}" y="10" width="10" height="10" fill="{c}"/><text x="{tx:.0}" y="19" font-size="11">{n}</text>"#,
            c = PALETTE[i],
            tx = x + 13.0,
            n = esc(n)
        );
        x += 18.0 + 6.5 * n.chars().count() as f64;
    }
}

/// A line chart; x in the points' unit, labelled `x_label`; y from 0.
pub fn line_chart(id: &str, title: &str, x_label: &str, y_label: &str, lines: &[Line]) -> String {
    line_chart_from(id, title, x_label, y_label, lines, 0.0)
}

/// A line chart whose y axis starts at `y_min` (values below it sit on the axis).
pub fn line_chart_from(id: &str, title: &str, x_label: &str, y_label: &str, lines: &[Line], y_min: f64) -> String {
    let mut s = String::new();
    let x_min = lines.iter().flat_map(|l| l.points.first()).map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x_max = lines.iter().flat_map(|l| l.points.last()).map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let (x_min, x_max) = if x_min.is_finite() && x_max > x_min { (x_min, x_max) } else { (0.0, 1.0) };
    let top = lines.iter().flat_map(|l| l.points.iter()).map(|p| p.1).fold(y_min, f64::max);
    let y_max = y_min + nice_max(top - y_min);
    frame(&mut s, id, title, y_label, y_min, y_max);
    let px = |x: f64| L + (W - L - R) * (x - x_min) / (x_max - x_min);
    let py = |y: f64| H - B - (H - T - B) * ((y - y_min) / (y_max - y_min)).clamp(0.0, 1.05);
    for k in 0..=5 {
        let x = x_min + (x_max - x_min) * f64::from(k) / 5.0;
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{}" font-size="10" text-anchor="middle">{}</text>"#,
            px(x),
            H - B + 14.0,
            tick(x)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">{}</text>"#,
        L + (W - L - R) / 2.0,
        H - 8.0,
        esc(x_label)
    );
    for (i, l) in lines.iter().enumerate() {
        if l.points.is_empty() {
            continue;
        }
        let d: Vec<String> = l.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"#,
            PALETTE[i % PALETTE.len()],
            d.join(" ")
        );
    }
    legend(&mut s, title, &lines.iter().map(|l| l.name.clone()).collect::<Vec<_>>());
    s.push_str("</svg>");
    s
}

/// A grouped bar chart: one group per category, one bar per series.
pub fn bar_chart(id: &str, title: &str, y_label: &str, categories: &[String], series: &[(String, Vec<f64>)]) -> String {
    let mut s = String::new();
    let y_max = nice_max(series.iter().flat_map(|x| x.1.iter()).copied().fold(0.0, f64::max));
    frame(&mut s, id, title, y_label, 0.0, y_max);
    let n = categories.len().max(1) as f64;
    let group_w = (W - L - R) / n;
    let bar_w = (group_w * 0.8) / series.len().max(1) as f64;
    for (ci, c) in categories.iter().enumerate() {
        let gx = L + group_w * ci as f64 + group_w * 0.1;
        for (si, (_, vals)) in series.iter().enumerate() {
            let v = vals.get(ci).copied().unwrap_or(0.0).max(0.0);
            let h = (H - T - B) * (v / y_max).min(1.05);
            let _ = write!(
                s,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                gx + bar_w * si as f64,
                H - B - h,
                bar_w.max(1.0),
                h,
                PALETTE[si % PALETTE.len()],
                esc(c),
                tick(v)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle">{}</text>"#,
            gx + group_w * 0.4,
            H - B + 14.0,
            esc(c)
        );
    }
    legend(&mut s, title, &series.iter().map(|x| x.0.clone()).collect::<Vec<_>>());
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_self_contained_svg() {
        let l = line_chart("c", "P <1>", "h", "kW", &[Line { name: "a".into(), points: vec![(0.0, 1.0), (1.0, 3.0)] }]);
        assert!(l.starts_with("<svg") && l.ends_with("</svg>") && l.contains("polyline") && l.contains("P &lt;1&gt;"));
        assert!(!l.contains("href"));
        let b = bar_chart("b", "E", "kWh", &["SS".into()], &[("x".into(), vec![2.0])]);
        assert!(b.contains("<rect") && b.contains("SS"));
        assert_eq!(downsample(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0), (3.0, 7.0)], 2), vec![(0.5, 2.0), (2.5, 6.0)]);
    }

    #[test]
    fn a_chart_from_a_y_minimum_spans_it_to_the_top_and_puts_lower_values_on_the_axis() {
        let line = Line { name: "a".into(), points: vec![(0.0, 97.0), (1.0, 100.0), (2.0, 90.0)] };
        let c = line_chart_from("c", "t", "h", "%", &[line], 95.0);
        // Ticks from 95 to 100 (a span of 5, the next nice size above the 5 the values need).
        let y_tick = |v: &str| c.contains(&format!("text-anchor=\"end\">{v}</text>"));
        assert!(y_tick("95.0") && y_tick("100") && !y_tick("0"), "{c}");
        // The point at 100 sits on the top grid line (y = T), the one at 90 on the axis (y = H - B).
        let pts = &c[c.find("points=\"").unwrap() + 8..];
        let ys: Vec<f64> =
            pts[..pts.find('"').unwrap()].split(' ').map(|p| p.split(',').nth(1).unwrap().parse().unwrap()).collect();
        assert!((ys[1] - T).abs() < 0.06 && (ys[2] - (H - B)).abs() < 0.06, "{ys:?}");
        assert!((ys[0] - (H - B - (H - T - B) * 0.4)).abs() < 0.06, "97 is 2/5 of the way up: {ys:?}");
    }
}
