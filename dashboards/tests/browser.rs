//! The browser helper really catches a thrown error, reads the DOM after
//! scripts, and takes a non-blank screenshot.

use dashboards::browser::{check_page, chromium_from_env, png_colours};

#[test]
fn a_page_that_throws_is_caught_and_a_clean_one_is_not() {
    let chromium = chromium_from_env();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("throws.html");
    std::fs::write(
        &bad,
        "<!DOCTYPE html><html><head><link rel=\"icon\" href=\"data:,\"></head><body style=\"background:#fff\">\
         <p id=\"x\">before</p><script>document.getElementById('x').textContent = 'after';\
         setTimeout(function () { null.boom(); }, 200);</script></body></html>",
    )
    .unwrap();
    let png = dir.path().join("throws.png");
    let c = check_page(&chromium, &format!("file://{}", bad.display()), &png).unwrap();
    assert!(c.dom.contains("<p id=\"x\">after</p>"), "{}", c.dom);
    assert!(c.console_errors.iter().any(|e| e.contains("Uncaught TypeError")), "{:?}", c.console_errors);

    let good = dir.path().join("good.html");
    std::fs::write(
        &good,
        "<!DOCTYPE html><html><head><link rel=\"icon\" href=\"data:,\"></head><body>\
         <h1 style=\"color:#c00\">Hello</h1><div style=\"width:300px;height:200px;background:#06c\"></div></body></html>",
    )
    .unwrap();
    let png = dir.path().join("good.png");
    let c = check_page(&chromium, &format!("file://{}", good.display()), &png).unwrap();
    assert!(c.console_errors.is_empty(), "{:?}", c.console_errors);
    assert!(png_colours(&png, 64).unwrap() > 2);

    let blank = dir.path().join("blank.html");
    std::fs::write(&blank, "<!DOCTYPE html><html><head><link rel=\"icon\" href=\"data:,\"></head><body></body></html>")
        .unwrap();
    let png = dir.path().join("blank.png");
    check_page(&chromium, &format!("file://{}", blank.display()), &png).unwrap();
    assert_eq!(png_colours(&png, 64).unwrap(), 1, "a blank page is one colour");
}
