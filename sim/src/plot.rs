//! The plot of a run: the traced nodes' bytes over time, the fleet's completions, T_min.

use std::path::Path;

/// Writes an SVG: one line per traced node (bytes held over time), the share of the fleet
/// done over time (black, right axis) and T_min (red).
pub(crate) fn write_svg(
    path: &Path,
    traces: &[&[(f64, u64)]],
    finish: &[f64],
    size: u64,
    t_min: f64,
) -> std::io::Result<()> {
    let (w, h, pad) = (800.0, 480.0, 50.0);
    let t_max = traces
        .iter()
        .flat_map(|t| t.iter().map(|(x, _)| *x))
        .chain(finish.iter().copied())
        .fold(t_min * 1.1, f64::max);
    let x = |t: f64| pad + (w - 2.0 * pad) * t / t_max;
    let y = |frac: f64| h - pad - (h - 2.0 * pad) * frac;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{cx}\" y=\"{ty}\" text-anchor=\"middle\">simulated seconds (0 to {t_max:.1})</text>\n\
         <text x=\"12\" y=\"{top}\">bytes held (0 to {size}); black: share of the fleet done</text>\n\
         <line x1=\"{tm}\" y1=\"{pad}\" x2=\"{tm}\" y2=\"{b}\" stroke=\"red\" stroke-dasharray=\"4 4\"/>\n\
         <text x=\"{tm}\" y=\"{lt}\" fill=\"red\">T_min {t_min:.1}s</text>\n",
        b = h - pad,
        r = w - pad,
        cx = w / 2.0,
        ty = h - 15.0,
        top = pad - 25.0,
        tm = x(t_min),
        lt = pad - 8.0,
    );
    let colors = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf",
    ];
    for (k, trace) in traces.iter().enumerate() {
        // At most ~400 points a line.
        let step = (trace.len() / 400).max(1);
        let pts: Vec<String> = std::iter::once((0.0, 0))
            .chain(trace.iter().step_by(step).copied())
            .chain(trace.last().copied())
            .map(|(t, b)| format!("{:.1},{:.1}", x(t), y(b as f64 / size.max(1) as f64)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1\" points=\"{}\"/>\n",
            colors[k % colors.len()],
            pts.join(" ")
        ));
    }
    if !finish.is_empty() {
        let n = finish.len() as f64;
        let step = (finish.len() / 400).max(1);
        let pts: Vec<String> = finish
            .iter()
            .enumerate()
            .step_by(step)
            .chain(finish.iter().enumerate().next_back())
            .map(|(i, t)| format!("{:.1},{:.1}", x(*t), y((i + 1) as f64 / n)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"black\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        ));
    }
    svg.push_str("</svg>\n");
    std::fs::write(path, svg)
}
