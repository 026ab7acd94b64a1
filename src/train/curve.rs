//! The training curve as a small self-contained SVG: training loss per step, and held-out loss
//! and accuracy where they were measured.

use std::fmt::Write;
use std::path::Path;

use super::StepReport;
use crate::error::Result;

const W: f64 = 720.0;
const H: f64 = 360.0;
const PAD: f64 = 48.0;

pub fn write_svg(path: &Path, reports: &[StepReport]) -> Result<()> {
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let last_step = reports.last().map_or(1, |r| r.step).max(1) as f64;
    let losses: Vec<(f64, f64)> = reports.iter().map(|r| (r.step as f64, r.loss)).collect();
    let eval_losses: Vec<(f64, f64)> = reports
        .iter()
        .filter_map(|r| r.eval.as_ref().map(|e| (r.step as f64, e.loss)))
        .collect();
    let accuracy: Vec<(f64, f64)> = reports
        .iter()
        .filter_map(|r| r.eval.as_ref()?.accuracy.map(|a| (r.step as f64, a)))
        .collect();
    let max_loss = losses
        .iter()
        .chain(&eval_losses)
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(1e-9, f64::max);
    let x = |step: f64| PAD + (W - 2.0 * PAD) * step / last_step;
    let y = |v: f64, max: f64| H - PAD - (H - 2.0 * PAD) * (v / max).clamp(0.0, 1.0);
    let _ = writeln!(
        svg,
        "<line x1=\"{PAD}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/><line x1=\"{PAD}\" y1=\"{PAD}\" x2=\"{PAD}\" y2=\"{b}\" stroke=\"black\"/>",
        b = H - PAD,
        r = W - PAD
    );
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\">step (last {last_step})</text>",
        W / 2.0 - 30.0,
        H - 12.0
    );
    let _ = writeln!(
        svg,
        "<text x=\"4\" y=\"{}\">loss 0–{max_loss:.3}</text>",
        PAD - 16.0
    );
    let mut line = |points: &[(f64, f64)], max: f64, color: &str, label: &str, row: f64| {
        if points.is_empty() {
            return;
        }
        let coords: Vec<String> = points
            .iter()
            .map(|&(s, v)| format!("{:.1},{:.1}", x(s), y(v, max)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{color}\">{label}</text>",
            coords.join(" "),
            W - PAD - 150.0,
            PAD + 14.0 * row
        );
    };
    line(&losses, max_loss, "#1f77b4", "training loss", 0.0);
    line(&eval_losses, max_loss, "#ff7f0e", "held-out loss", 1.0);
    line(&accuracy, 1.0, "#2ca02c", "held-out accuracy (0–1)", 2.0);
    svg.push_str("</svg>\n");
    super::write_atomic(path, svg.as_bytes())
}
