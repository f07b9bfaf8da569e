//! PNG plot of broker RSS against open connections, with the linear fit.
//!
//! Text is drawn with ab_glyph from a TrueType font loaded at run time
//! (`$MQTTD_BENCH_FONT`, else DejaVu/Liberation in the usual places, else
//! the first `.ttf` under /usr/share/fonts). Without a font the plot is
//! still written, just without labels.

use super::project::Fit;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/Library/Fonts/Arial.ttf",
];

fn find_ttf(dir: &Path, depth: u32) -> Option<std::path::PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(dir).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in &entries {
        let p = e.path();
        if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("ttf")) {
            return Some(p);
        }
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|e| e.path().is_dir())
        .find_map(|e| find_ttf(&e.path(), depth - 1))
}

/// Register a sans-serif font once; false when none could be loaded.
fn ensure_font() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let mut paths: Vec<std::path::PathBuf> = Vec::new();
        if let Ok(p) = std::env::var("MQTTD_BENCH_FONT") {
            paths.push(p.into());
        }
        paths.extend(FONT_CANDIDATES.iter().map(Into::into));
        if let Some(p) = find_ttf(Path::new("/usr/share/fonts"), 3) {
            paths.push(p);
        }
        for p in paths {
            if let Ok(bytes) = std::fs::read(&p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Draw `points` (connections, RSS bytes) and the fit line to a PNG.
/// Returns whether labels were drawn (a font was found).
pub fn plot_rss(path: &Path, points: &[(f64, f64)], fit: &Fit, title: &str) -> Result<bool> {
    let labels = ensure_font();
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let xmax = points.iter().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let ymax = points
        .iter()
        .map(|p| mib(p.1))
        .fold(mib(fit.intercept + fit.slope * xmax), f64::max)
        * 1.1;
    let ymin = points
        .iter()
        .map(|p| mib(p.1))
        .fold(mib(fit.intercept).min(f64::MAX), f64::min)
        .min(0.0);

    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if labels {
        builder
            .caption(title, ("sans-serif", 26))
            .x_label_area_size(55)
            .y_label_area_size(80);
    } else {
        builder.x_label_area_size(10).y_label_area_size(10);
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..xmax, ymin..ymax)
        .map_err(|e| anyhow!("plot: {e}"))?;
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(RGBColor(235, 235, 235));
    if labels {
        mesh.x_desc("open idle connections")
            .y_desc("broker RSS, all processes (MiB)")
            .x_label_formatter(&|x| format!("{:.0}", x))
            .y_label_formatter(&|y| format!("{:.0}", y))
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18));
    } else {
        mesh.disable_x_mesh().disable_y_mesh();
    }
    mesh.draw().map_err(|e| anyhow!("plot: {e}"))?;

    let line_color = RGBColor(200, 40, 40);
    let point_color = RGBColor(30, 90, 200);
    {
        let fit_series = chart
            .draw_series(LineSeries::new(
                [0.0, xmax]
                    .into_iter()
                    .map(|x| (x, mib(fit.intercept + fit.slope * x))),
                line_color.stroke_width(2),
            ))
            .map_err(|e| anyhow!("plot: {e}"))?;
        if labels {
            fit_series
                .label(format!(
                    "fit: {:.0} B/connection + {:.1} MiB baseline (R² = {:.4})",
                    fit.slope,
                    mib(fit.intercept),
                    fit.r2
                ))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], line_color.stroke_width(2))
                });
        }
    }
    {
        let pts_series = chart
            .draw_series(
                points
                    .iter()
                    .map(|&(x, y)| Circle::new((x, mib(y)), 5, point_color.filled())),
            )
            .map_err(|e| anyhow!("plot: {e}"))?;
        if labels {
            pts_series
                .label("measured (settled RSS after each step)")
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, point_color.filled()));
        }
    }
    if labels {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
    }
    root.present().map_err(|e| anyhow!("plot: {e}"))?;
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let dir = std::env::temp_dir().join(format!("mqttd-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rss.png");
        let pts: Vec<(f64, f64)> = (0..5)
            .map(|i| (i as f64 * 1000.0, 8e6 + 3000.0 * i as f64 * 1000.0))
            .collect();
        let fit = super::super::project::linear_fit(&pts).unwrap();
        plot_rss(&path, &pts, &fit, "test").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
