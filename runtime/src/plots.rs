//! PNG plots of the evaluation (plotters, bitmap backend).
//!
//! Text is drawn with ab_glyph from a TrueType font found on the system
//! (DejaVu Sans, which scripts/setup.sh installs), so no fontconfig or
//! freetype development files are needed at build time.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use branchpoint_core::calibration::ReliabilityBin;
use plotters::prelude::*;
use plotters::style::FontStyle;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 600;
const FONT_CANDIDATES: &[&str] = &["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];

/// Colours by method, the same in every plot.
pub fn method_color(i: usize) -> RGBColor {
    [RGBColor(214, 39, 40), RGBColor(31, 119, 180), RGBColor(44, 160, 44), RGBColor(148, 103, 189)][i % 4]
}

/// Registers the font once; later calls return the first outcome.
pub fn ensure_font() -> Result<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let path: Option<PathBuf> = std::env::var_os("BRANCHPOINT_FONT").map(PathBuf::from).into_iter().chain(FONT_CANDIDATES.iter().map(PathBuf::from)).find(|p| p.is_file());
        let Some(path) = path else {
            return Err(format!(
                "no TrueType font for plot text: looked for {}; install Debian's fonts-dejavu-core \
                 (scripts/setup.sh does) or set BRANCHPOINT_FONT to a .ttf file",
                FONT_CANDIDATES.join(", ")
            ));
        };
        let bytes = std::fs::read(&path).map_err(|e| format!("reading font {}: {e}", path.display()))?;
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| format!("{} is not a usable TrueType font", path.display()))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// One named curve of (x, y) points.
pub struct Curve {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

pub struct LinePlot<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub x_range: (f64, f64),
    pub y_range: (f64, f64),
    pub curves: Vec<Curve>,
    /// Where the legend goes: a corner the curves leave free.
    pub legend: SeriesLabelPosition,
}

fn draw_err<E: std::fmt::Debug>(path: &Path) -> impl FnOnce(E) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {}: {e:?}", path.display())
}

/// A line plot with markers and a legend.
pub fn line_plot(path: &Path, plot: &LinePlot) -> Result<()> {
    ensure_font()?;
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(plot.title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(65)
        .build_cartesian_2d(plot.x_range.0..plot.x_range.1, plot.y_range.0..plot.y_range.1)
        .map_err(draw_err(path))?;
    chart
        .configure_mesh()
        .x_desc(plot.x_label)
        .y_desc(plot.y_label)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_err(path))?;
    for c in &plot.curves {
        let color = c.color;
        let style = color.stroke_width(if c.dashed { 1 } else { 2 });
        if c.dashed {
            chart
                .draw_series(DashedLineSeries::new(c.points.iter().copied(), 8, 6, style))
                .map_err(draw_err(path))?
                .label(&c.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1)));
        } else {
            chart.draw_series(LineSeries::new(c.points.iter().copied(), style)).map_err(draw_err(path))?;
            chart
                .draw_series(c.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(draw_err(path))?
                .label(&c.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
    }
    draw_legend(&mut chart, plot.legend.clone(), 16, path)?;
    root.present().map_err(draw_err(path))?;
    Ok(())
}

type Chart2d<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>>;

/// The series labels, in a white box with a black border.
fn draw_legend<'a, 'b: 'a>(chart: &mut Chart2d<'a, 'b>, position: SeriesLabelPosition, font: u32, path: &Path) -> Result<()> {
    chart.configure_series_labels().position(position).background_style(WHITE.mix(0.85)).border_style(BLACK).label_font(("sans-serif", font)).draw().map_err(draw_err(path))
}

/// A reliability diagram: one panel per (label, bins), accuracy bars per
/// confidence bin against the diagonal of perfect calibration, with the
/// panel's ECE in its title.
pub fn reliability_diagram(path: &Path, title: &str, panels: &[(String, f64, &[ReliabilityBin])]) -> Result<()> {
    ensure_font()?;
    if panels.is_empty() {
        bail!("no reliability panels to draw");
    }
    let root = BitMapBackend::new(path, (520 * panels.len() as u32, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let root = root.titled(title, ("sans-serif", 24)).map_err(draw_err(path))?;
    for (area, (label, ece, bins)) in root.split_evenly((1, panels.len())).iter().zip(panels) {
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{label} (ECE {:.4})", ece), ("sans-serif", 19))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(draw_err(path))?;
        chart
            .configure_mesh()
            .x_desc("confidence (max softmax)")
            .y_desc("accuracy")
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(draw_err(path))?;
        let bar = RGBColor(31, 119, 180);
        chart
            .draw_series(bins.iter().filter(|b| b.count > 0).map(|b| Rectangle::new([(b.lo + 0.004, 0.0), (b.hi - 0.004, b.accuracy)], bar.mix(0.75).filled())))
            .map_err(draw_err(path))?
            .label("accuracy in bin")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], bar.mix(0.75).filled()));
        let gap = RGBColor(214, 39, 40);
        chart
            .draw_series(bins.iter().filter(|b| b.count > 0).map(|b| Circle::new((0.5 * (b.lo + b.hi), b.mean_confidence), 3, gap.filled())))
            .map_err(draw_err(path))?
            .label("mean confidence in bin")
            .legend(move |(x, y)| Circle::new((x + 7, y), 3, gap.filled()));
        chart
            .draw_series(LineSeries::new(vec![(0.0, 0.0), (1.0, 1.0)], BLACK.stroke_width(1)))
            .map_err(draw_err(path))?
            .label("perfect calibration")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(1)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(draw_err(path))?;
    }
    root.present().map_err(draw_err(path))?;
    Ok(())
}

/// Creates the plot folder, with a message that names it on failure.
pub fn prepare_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating plot folder {}", dir.display()))
}

/// One panel of a time-series figure.
pub struct Panel<'a> {
    pub y_label: &'a str,
    pub y_range: (f64, f64),
    pub curves: Vec<Curve>,
}

/// Panels stacked vertically over one time axis (seconds); lines without
/// markers, a legend in each panel.
pub fn time_panels(path: &Path, title: &str, x_range: (f64, f64), panels: &[Panel]) -> Result<()> {
    ensure_font()?;
    let height = 60 + 260 * panels.len() as u32;
    let root = BitMapBackend::new(path, (WIDTH + 200, height)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let root = root.titled(title, ("sans-serif", 24)).map_err(draw_err(path))?;
    let areas = root.split_evenly((panels.len(), 1));
    for (area, panel) in areas.iter().zip(panels) {
        let (lo, hi) = panel.y_range;
        let hi = if hi > lo { hi } else { lo + 1.0 };
        let mut chart = ChartBuilder::on(area).margin(10).x_label_area_size(35).y_label_area_size(65).build_cartesian_2d(x_range.0..x_range.1, lo..hi).map_err(draw_err(path))?;
        chart
            .configure_mesh()
            .x_desc("time (s)")
            .y_desc(panel.y_label)
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(draw_err(path))?;
        for c in &panel.curves {
            let color = c.color;
            let series = if c.dashed {
                chart.draw_series(DashedLineSeries::new(c.points.iter().copied(), 6, 4, color.stroke_width(2))).map_err(draw_err(path))?
            } else {
                chart.draw_series(LineSeries::new(c.points.iter().copied(), color.stroke_width(2))).map_err(draw_err(path))?
            };
            series.label(&c.label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        if !panel.curves.is_empty() {
            draw_legend(&mut chart, SeriesLabelPosition::Coordinate(WIDTH as i32 - 160, 5), 14, path)?;
        }
    }
    root.present().map_err(draw_err(path))?;
    Ok(())
}

/// One bar chart per metric, side by side: a bar per category, its value
/// written above it.
pub fn grouped_bars(path: &Path, title: &str, categories: &[String], colors: &[RGBColor], metrics: &[(&str, Vec<f64>)]) -> Result<()> {
    ensure_font()?;
    let root = BitMapBackend::new(path, (WIDTH + 500, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let root = root.titled(title, ("sans-serif", 24)).map_err(draw_err(path))?;
    let areas = root.split_evenly((1, metrics.len()));
    let n = categories.len();
    for (area, (name, values)) in areas.iter().zip(metrics) {
        let top = values.iter().copied().fold(0.0, f64::max);
        let top = if top > 0.0 { top * 1.15 } else { 1.0 };
        let mut chart = ChartBuilder::on(area)
            .caption(*name, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((0..n as i32 - 1).into_segmented(), 0.0..top)
            .map_err(draw_err(path))?;
        let label = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => categories.get(*i as usize).cloned().unwrap_or_default(),
            SegmentValue::Last => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&label)
            .label_style(("sans-serif", 13))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(draw_err(path))?;
        for (i, &v) in values.iter().enumerate() {
            let color = colors[i % colors.len()];
            chart.draw_series(Histogram::vertical(&chart).style(color.filled()).margin(8).data(std::iter::once((i as i32, v)))).map_err(draw_err(path))?;
            chart.draw_series(std::iter::once(Text::new(format!("{v:.1}"), (SegmentValue::CenterOf(i as i32), v + top * 0.03), ("sans-serif", 14)))).map_err(draw_err(path))?;
        }
    }
    root.present().map_err(draw_err(path))?;
    Ok(())
}
