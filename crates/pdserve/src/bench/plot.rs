//! Latency against load as an SVG or PNG chart (plotters). Text needs a TrueType font:
//! DejaVu Sans from the system (Debian's fonts-dejavu-core), or `PDSERVE_PLOT_FONT`.
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, bail};
use plotters::prelude::*;

/// One line of the chart: a name and its (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A chart per panel, side by side, sharing the x axis' meaning.
pub struct Panel {
    pub y_label: String,
    pub series: Vec<Series>,
}

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let custom = std::env::var("PDSERVE_PLOT_FONT").ok();
        let path = custom
            .iter()
            .map(String::as_str)
            .chain(FONT_PATHS)
            .find(|p| Path::new(p).is_file())
            .ok_or_else(|| "no TrueType font for the plot: install fonts-dejavu-core or set PDSERVE_PLOT_FONT".to_string())?;
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        // plotters keeps fonts for the life of the process; so does this one.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| format!("{path}: not a usable font"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Draws the panels into `path` (`.svg` or `.png`).
pub fn draw(path: &Path, title: &str, x_label: &str, panels: &[Panel]) -> anyhow::Result<()> {
    register_font()?;
    let size = (640 * panels.len().max(1) as u32, 480);
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "svg" => render(SVGBackend::new(path, size).into_drawing_area(), title, x_label, panels),
        "png" => render(BitMapBackend::new(path, size).into_drawing_area(), title, x_label, panels),
        _ => bail!("--plot {}: the file must end in .svg or .png", path.display()),
    }
    .with_context(|| format!("drawing {}", path.display()))
}

fn render<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    panels: &[Panel],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e:?}");
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (panel, area) in panels.iter().zip(areas) {
        let pts = || panel.series.iter().flat_map(|s| s.points.iter());
        let x_max = pts().map(|p| p.0).fold(0.0f64, f64::max) * 1.1 + 1e-9;
        let y_max = pts().map(|p| p.1).fold(0.0f64, f64::max) * 1.1 + 1e-9;
        let mut chart = ChartBuilder::on(&area)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(panel.y_label.as_str())
            .draw()
            .map_err(err)?;
        for (i, s) in panel.series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
                .map_err(err)?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_svg_with_every_series_and_refuses_other_formats() {
        let dir = tempfile::tempdir().unwrap();
        let panels = [Panel {
            y_label: "TTFT ms".into(),
            series: vec![
                Series {
                    name: "nixl p50".into(),
                    points: vec![(1.0, 2.0), (2.0, 3.0)],
                },
                Series {
                    name: "tcp p50".into(),
                    points: vec![(1.0, 4.0), (2.0, 6.0)],
                },
            ],
        }];
        let svg = dir.path().join("p.svg");
        draw(&svg, "latency against load", "requests/s", &panels).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg") && text.contains("nixl p50") && text.contains("tcp p50"));
        let png = dir.path().join("p.png");
        draw(&png, "t", "x", &panels).unwrap();
        assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
        assert!(draw(&dir.path().join("p.pdf"), "t", "x", &panels).is_err());
    }
}
