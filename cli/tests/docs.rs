//! The documentation as a reader meets it: README.md is a short front door
//! whose first code block starts with the two commands; every relative link
//! in README.md and docs/*.md leads to a file of this repository (and to a
//! heading of it, for a `#anchor`); docs/configuration.md names every key of
//! the shipped configs (commented-out examples included) by its full dotted
//! path in backticks; nothing points outside the repository but http(s) URLs.
//! No service is needed: `cargo test -p dynamollm --test docs`.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

/// The most lines README.md may have: a front door, not a manual.
const README_MAX_LINES: usize = 150;

/// The first two commands of README.md's first code block, in this order.
const FIRST_COMMANDS: [&str; 2] = ["cargo run --release -p dynamollm -- demo", "scripts/test"];

/// Text no page may contain: files outside the repository that a reader never has.
const FORBIDDEN: [&str; 3] = ["../shared", "TWIN-PHYSICS", "DESIGN.md"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// README.md and every docs/*.md, as paths relative to the root.
fn pages() -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .map(|p| PathBuf::from("docs").join(p.file_name().unwrap()))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ holds no .md page");
    out.extend(docs);
    out
}

/// Whether a line opens or closes a fenced code block.
fn is_fence(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("```") || t.starts_with("~~~")
}

/// The text outside fenced code blocks and inline code spans, each line with
/// its 1-based number. A code span opened by a run of n backticks ends at the
/// next run of exactly n (it may cross lines, as Markdown allows).
fn prose_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_fence = false;
    let mut span: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        if span.is_none() && is_fence(line) {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let chars: Vec<char> = line.chars().collect();
        let mut kept = String::new();
        let mut j = 0;
        while j < chars.len() {
            if chars[j] == '`' {
                let mut n = 0;
                while j + n < chars.len() && chars[j + n] == '`' {
                    n += 1;
                }
                span = match span {
                    None => Some(n),
                    Some(open) if open == n => None,
                    other => other,
                };
                j += n;
                continue;
            }
            if span.is_none() {
                kept.push(chars[j]);
            }
            j += 1;
        }
        out.push((i + 1, kept));
    }
    out
}

/// Every inline link target `[text](target)` of a page, with its line.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in prose_lines(text) {
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            // The target ends at the parenthesis that closes the one opened.
            let mut depth = 0usize;
            let mut end = None;
            for (k, c) in after.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' if depth == 0 => {
                        end = Some(k);
                        break;
                    }
                    ')' => depth -= 1,
                    _ => {}
                }
            }
            let Some(end) = end else { panic!("line {n}: a link target that never closes: {rest:?}") };
            // `(target "title")`: the target is the first word.
            let target = after[..end].split_whitespace().next().unwrap_or("").to_string();
            out.push((n, target));
            rest = &after[end..];
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, only letters, digits, `-`, `_`
/// and spaces kept, spaces turned to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file's headings (a repeated one gets `-1`, `-2`…).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut in_fence = false;
    for line in text.lines() {
        if is_fence(line) {
            in_fence = !in_fence;
            continue;
        }
        let t = line.trim_start();
        if in_fence || !t.starts_with('#') {
            continue;
        }
        let level = t.chars().take_while(|c| *c == '#').count();
        let rest = &t[level..];
        if level > 6 || !(rest.is_empty() || rest.starts_with(' ')) {
            continue;
        }
        // What the heading reads as: code spans lose their backticks, links keep their text.
        let mut text = rest.trim().trim_end_matches('#').trim().replace('`', "");
        while let (Some(open), Some(mid)) = (text.find('['), text.find("](")) {
            let Some(close) = text[mid..].find(')').map(|c| mid + c) else { break };
            if open > mid {
                break;
            }
            text = format!("{}{}{}", &text[..open], &text[open + 1..mid], &text[close + 1..]);
        }
        let base = slug(&text);
        let mut s = base.clone();
        let mut k = 0;
        while out.contains(&s) {
            k += 1;
            s = format!("{base}-{k}");
        }
        out.insert(s);
    }
    out
}

/// Why a link of `page` does not lead where it should, if it does not.
fn link_problem(page: &Path, target: &str) -> Option<String> {
    if target.starts_with("http://") || target.starts_with("https://") || target.starts_with("mailto:") {
        return None;
    }
    if target.is_empty() {
        return Some("an empty link".into());
    }
    if let Some((scheme, _)) = target.split_once(':') {
        if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c)) {
            return Some(format!("{target}: a link outside the repository (only http(s) URLs may leave it)"));
        }
    }
    let (path, anchor) = match target.split_once('#') {
        Some((p, a)) => (p, Some(a)),
        None => (target, None),
    };
    if path.starts_with('/') {
        return Some(format!("{target}: an absolute path; links are relative to the page"));
    }
    // Resolve against the page's folder without touching the file system, so
    // that a link climbing out of the repository is caught even if its target exists.
    let mut resolved: Vec<String> =
        page.parent().unwrap_or(Path::new("")).iter().map(|c| c.to_string_lossy().into()).collect();
    for c in Path::new(path).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if resolved.pop().is_none() {
                    return Some(format!("{target}: leads outside the repository"));
                }
            }
            Component::Normal(s) => resolved.push(s.to_string_lossy().into()),
            _ => return Some(format!("{target}: not a relative path")),
        }
    }
    let rel: PathBuf = if path.is_empty() { page.to_path_buf() } else { resolved.iter().collect() };
    let file = root().join(&rel);
    if !file.exists() {
        return Some(format!("{target}: {} does not exist", rel.display()));
    }
    match anchor {
        Some(a) if file.is_file() && rel.extension().is_some_and(|x| x == "md") => {
            let found = anchors(&read(&file));
            (!found.contains(a)).then(|| {
                format!("{target}: {} has no heading with the anchor #{a} (it has: {})", rel.display(), {
                    let v: Vec<&str> = found.iter().map(String::as_str).collect();
                    v.join(", ")
                })
            })
        }
        _ => None,
    }
}

#[test]
fn the_readme_is_a_short_front_door_that_starts_with_the_two_commands() {
    let text = read(&root().join("README.md"));
    let lines = text.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines; at most {README_MAX_LINES} (move the rest to docs/)"
    );
    let mut it = text.lines().skip_while(|l| !is_fence(l));
    assert!(it.next().is_some(), "README.md has no code block");
    let first: Vec<&str> = it.take(2).collect();
    assert_eq!(first.len(), 2, "README.md's first code block is shorter than two lines");
    for (line, want) in first.iter().zip(FIRST_COMMANDS) {
        // The command, without its comment.
        let command = line.split(" #").next().unwrap_or("").trim();
        assert_eq!(
            command, want,
            "README.md's first code block must start with `{}` then `{}`; found {first:?}",
            FIRST_COMMANDS[0], FIRST_COMMANDS[1]
        );
    }
}

#[test]
fn every_relative_link_leads_to_a_file_and_heading_of_the_repository() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in pages() {
        for (line, target) in links(&read(&root().join(&page))) {
            checked += 1;
            if let Some(p) = link_problem(&page, &target) {
                problems.push(format!("{}:{line}: {p}", page.display()));
            }
        }
    }
    assert!(checked > 20, "only {checked} links found: is the link parser broken?");
    assert!(problems.is_empty(), "broken links:\n{}", problems.join("\n"));
}

#[test]
fn no_page_points_outside_the_repository() {
    let mut problems = Vec::new();
    for page in pages() {
        let text = read(&root().join(&page));
        for (n, line) in text.lines().enumerate() {
            for bad in FORBIDDEN {
                if line.contains(bad) {
                    problems.push(format!("{}:{}: mentions {bad}, which readers do not have", page.display(), n + 1));
                }
            }
        }
        for (n, target) in links(&text) {
            let external = target.starts_with("http://") || target.starts_with("https://");
            if !external {
                if let Some(p) =
                    link_problem(&page, &target).filter(|p| p.contains("outside") || p.contains("absolute"))
                {
                    problems.push(format!("{}:{n}: {p}", page.display()));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every key of a TOML document: each value's full dotted path, descending
/// into tables that are sections (`[a.b]` headers), not into inline tables;
/// and every commented-out example line `# key = value`, under the table whose
/// header (itself perhaps commented out, `# [a.b]`) comes before it.
fn config_keys(text: &str) -> BTreeSet<String> {
    let headers: Vec<String> =
        text.lines().filter_map(|l| header(l.trim_start().trim_start_matches('#').trim_start())).collect();
    fn walk(prefix: &str, t: &toml::Table, headers: &[String], out: &mut BTreeSet<String>) {
        for (k, v) in t {
            let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match v {
                toml::Value::Table(sub) if headers.iter().any(|h| *h == path || h.starts_with(&format!("{path}."))) => {
                    walk(&path, sub, headers, out)
                }
                _ => {
                    out.insert(path);
                }
            }
        }
    }
    let doc: toml::Table = text.parse().expect("the shipped config parses");
    let mut out = BTreeSet::new();
    walk("", &doc, &headers, &mut out);
    let mut table: Option<String> = None;
    for line in text.lines() {
        let t = line.trim_start();
        let commented = t.starts_with('#');
        let body = t.trim_start_matches('#').trim_start();
        if let Some(h) = header(body) {
            table = Some(h);
            continue;
        }
        if !commented {
            continue;
        }
        let key: String =
            body.chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        let after = body[key.len()..].trim_start();
        let starts_ok = key.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        if starts_ok && after.starts_with('=') && !after.starts_with("==") {
            if let Some(tb) = &table {
                out.insert(format!("{tb}.{key}"));
            }
        }
    }
    out
}

/// The table a header line names (`[a.b]` or `[[a.b]]`, a comment may follow), if it is one.
fn header(line: &str) -> Option<String> {
    let inner = line.strip_prefix('[')?;
    let inner = inner.strip_prefix('[').unwrap_or(inner);
    let end = inner.find(']')?;
    let name = &inner[..end];
    let ok = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        && !name.starts_with('.');
    ok.then(|| name.to_string())
}

#[test]
fn the_configuration_reference_names_every_key_of_the_shipped_configs() {
    let reference = read(&root().join("docs/configuration.md"));
    let mut missing = Vec::new();
    let mut seen = 0;
    for file in ["deploy/dynamollm.toml", "deploy/dynamollm-agent.toml"] {
        let keys = config_keys(&read(&root().join(file)));
        seen += keys.len();
        for key in keys {
            if !reference.contains(&format!("`{key}`")) {
                missing.push(format!("{file}: `{key}`"));
            }
        }
    }
    assert!(seen > 100, "only {seen} keys found in the shipped configs: is the key walker broken?");
    assert!(
        missing.is_empty(),
        "docs/configuration.md must name every key by its full dotted path in backticks; missing:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_key_walker_sees_sections_inline_tables_and_commented_examples() {
    let keys = config_keys(
        "# top prose = not a key\n[a]\nx = 1\nt = { p = 1 }\n# y = 2\n  # (prose) z = 3\n[a.b]\nw = \"#\"  # v = 4\n# [c.d]\n# u = 5\n# [1, 65535]\n# s = 6\n",
    );
    let want: BTreeSet<String> =
        ["a.x", "a.t", "a.y", "a.b.w", "c.d.u", "c.d.s"].iter().map(|s| s.to_string()).collect();
    assert_eq!(keys, want);
}

#[test]
fn links_anchors_and_slugs_are_read_as_github_reads_them() {
    let page = "# Title\n\n## `[carbon]`, `[cost]`, `[sci]`\n## The router's balance\n## A\n## A\n\
                See [x](a.md#b) and [`code`](c/d.md) (not `[e](f)`).\n```\n[g](h)\n```\n";
    let l: Vec<String> = links(page).into_iter().map(|(_, t)| t).collect();
    assert_eq!(l, vec!["a.md#b", "c/d.md"]);
    let a = anchors(page);
    for want in ["title", "carbon-cost-sci", "the-routers-balance", "a", "a-1"] {
        assert!(a.contains(want), "{want} not in {a:?}");
    }
    let docs = Path::new("docs/x.md");
    assert!(link_problem(docs, "../../outside.md").unwrap().contains("outside"));
    assert!(link_problem(docs, "file:///etc/passwd").unwrap().contains("outside"));
    assert!(link_problem(docs, "/etc/passwd").unwrap().contains("absolute"));
    assert!(link_problem(docs, "nowhere.md").unwrap().contains("does not exist"));
    assert!(link_problem(docs, "design.md#no-such-heading").unwrap().contains("no heading"));
    assert_eq!(link_problem(docs, "design.md#the-loop"), None);
    assert_eq!(link_problem(docs, "https://example.com/x"), None);
}

#[test]
fn the_example_scripts_of_the_operator_guide_are_executable_shell() {
    for name in ["spawn.sh", "retire.sh", "set-clock.sh"] {
        let path = root().join("deploy/examples").join(name);
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert!(meta.permissions().mode() & 0o111 != 0, "{} is not executable", path.display());
        }
        let out = std::process::Command::new("sh").arg("-n").arg(&path).output().expect("sh runs");
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn the_operator_guide_names_every_variable_an_exec_command_gets() {
    let source = read(&root().join("actuators/src/exec.rs"));
    let guide = read(&root().join("docs/operator-guide.md"));
    let mut vars = BTreeSet::new();
    for piece in source.split('"').skip(1).step_by(2) {
        if piece.starts_with("DYNAMOLLM_") && piece.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            vars.insert(piece.to_string());
        }
    }
    assert!(vars.len() >= 10, "only {vars:?} found in actuators/src/exec.rs: is the scan broken?");
    let missing: Vec<&String> = vars.iter().filter(|v| !guide.contains(&format!("`{v}`"))).collect();
    assert!(missing.is_empty(), "docs/operator-guide.md does not name {missing:?} (the exec backend's contract)");
}
