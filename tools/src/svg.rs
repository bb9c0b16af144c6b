//! Line charts as plain SVG for the benchmark and soak reports: axes with
//! ticks, one polyline per series, a legend. No plotting dependency.

use std::fmt::Write as _;

/// A named, coloured line of `(x, y)` points.
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// Colours for up to six series, readable on white.
pub const COLORS: [&str; 6] = ["#2980b9", "#c0392b", "#27ae60", "#8e44ad", "#d35400", "#7f8c8d"];

/// A chart of `series` with linear axes starting at zero.
pub fn chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h) = (760.0, 420.0);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 50.0);
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x_max = nice(all().map(|p| p.0).fold(0.0, f64::max));
    let y_max = nice(all().map(|p| p.1).fold(0.0, f64::max));
    let px = |x: f64| left + x / x_max * (w - left - right);
    let py = |y: f64| h - bottom - y / y_max * (h - top - bottom);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    svg.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = write!(
        svg,
        r#"<text x="{left}" y="22" font-size="14" font-weight="bold">{}</text>"#,
        esc(title)
    );
    for i in 0..=5 {
        let (xv, yv) = (x_max * i as f64 / 5.0, y_max * i as f64 / 5.0);
        let _ = write!(
            svg,
            r##"<line x1="{x}" y1="{t}" x2="{x}" y2="{b}" stroke="#eee"/><text x="{x}" y="{ty}" text-anchor="middle">{xv}</text>"##,
            x = px(xv),
            t = top,
            b = h - bottom,
            ty = h - bottom + 16.0,
            xv = fmt(xv)
        );
        let _ = write!(
            svg,
            r##"<line x1="{l}" y1="{y}" x2="{r}" y2="{y}" stroke="#eee"/><text x="{tx}" y="{ty}" text-anchor="end">{yv}</text>"##,
            l = left,
            r = w - right,
            y = py(yv),
            tx = left - 6.0,
            ty = py(yv) + 4.0,
            yv = fmt(yv)
        );
    }
    let _ = write!(
        svg,
        r#"<line x1="{left}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{b}" stroke="black"/>"#,
        b = h - bottom,
        r = w - right
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (left + w - right) / 2.0,
        h - 12.0,
        esc(x_label)
    );
    let _ = write!(
        svg,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0,
        esc(y_label)
    );
    for (k, s) in series.iter().enumerate() {
        let pts: Vec<String> =
            s.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            s.color,
            pts.join(" ")
        );
        let _ = write!(
            svg,
            r#"<rect x="{x}" y="{y}" width="12" height="4" fill="{c}"/><text x="{tx}" y="{ty}">{n}</text>"#,
            x = w - right - 220.0,
            y = top + 8.0 + 16.0 * k as f64,
            c = s.color,
            tx = w - right - 202.0,
            ty = top + 14.0 + 16.0 * k as f64,
            n = esc(&s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The cumulative distribution of `values`: `(value, percent at or below)`.
pub fn cdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len().max(1) as f64;
    // At most ~400 points: enough for a smooth line.
    let step = (v.len() / 400).max(1);
    let mut out: Vec<(f64, f64)> =
        v.iter().enumerate().step_by(step).map(|(i, x)| (*x, (i + 1) as f64 / n * 100.0)).collect();
    if let Some(&last) = v.last()
        && out.last() != Some(&(last, 100.0))
    {
        out.push((last, 100.0));
    }
    out
}

/// A round axis maximum at or above `v`.
fn nice(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|m| *m >= v).unwrap_or(10.0 * mag)
}

fn fmt(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() { format!("{v:.0}") } else { format!("{v:.2}") }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(3.2), 5.0);
        assert_eq!(nice(18.0), 20.0);
        assert_eq!(nice(101.0), 200.0);
    }

    #[test]
    fn a_cdf_ends_at_one_hundred_percent() {
        let c = cdf(&[3.0, 1.0, 2.0]);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].0, 1.0);
        assert!((c[0].1 - 100.0 / 3.0).abs() < 1e-9);
        assert_eq!(c.last(), Some(&(3.0, 100.0)));
    }
}
