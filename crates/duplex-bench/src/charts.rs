//! SVG bar charts of the runner's results (plotters' SVG backend: no
//! bitmap or font libraries; the viewer draws the text).
//!
//! The runner computes what to draw from the same medians and ratios as
//! its table; this module only lays out grouped bars on a log scale.

use std::{io, path::Path};

use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

/// One series of bars: a value per group, `None` where not measured.
#[derive(Debug, Clone)]
pub struct Series {
    /// The legend's name.
    pub name: String,
    /// One value per group.
    pub values: Vec<Option<f64>>,
}

/// A grouped bar chart with a logarithmic value axis.
#[derive(Debug, Clone)]
pub struct BarChart {
    /// Above the plot.
    pub title: String,
    /// The value axis, with its unit.
    pub y_label: String,
    /// The category axis, with its unit if any.
    pub x_label: String,
    /// The groups along the category axis.
    pub groups: Vec<String>,
    /// The bars of each group, one per series.
    pub series: Vec<Series>,
    /// A horizontal line: its value and its legend.
    pub reference: Option<(f64, String)>,
    /// Write each bar's value above it.
    pub value_labels: bool,
}

/// The series' colours, told apart in print too.
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("chart: {e}"))
}

/// Writes `charts` into one SVG at `path`, in `columns` columns of panels of
/// `panel` pixels, under `caption` (the machine and the date).
///
/// # Errors
/// The file cannot be written, or there is nothing to draw.
pub fn write_svg(
    path: &Path,
    caption: &str,
    charts: &[BarChart],
    columns: usize,
    panel: (u32, u32),
) -> io::Result<()> {
    if charts.is_empty() {
        return Err(err("no chart to draw"));
    }
    let columns = columns.clamp(1, charts.len());
    let rows = charts.len().div_ceil(columns);
    let size = (panel.0 * columns as u32, panel.1 * rows as u32 + 40);
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let body = root
        .titled(caption, ("sans-serif", 16).into_font())
        .map_err(err)?;
    for (area, chart) in body.split_evenly((rows, columns)).iter().zip(charts) {
        draw(area, chart)?;
    }
    root.present().map_err(err)
}

fn draw<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    chart: &BarChart,
) -> io::Result<()>
where
    DB::ErrorType: 'static,
{
    let values = || {
        chart
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten().copied())
    };
    let reference = chart.reference.as_ref().map(|(v, _)| *v);
    let max = values().chain(reference).fold(f64::MIN, f64::max);
    let min = values()
        .chain(reference)
        .filter(|v| *v > 0.0)
        .fold(f64::MAX, f64::min);
    if !(max.is_finite() && min.is_finite() && max > 0.0) {
        // Nothing measured: say so rather than draw empty axes.
        area.draw(&Text::new(
            format!("{}: not measured", chart.title),
            (20, 40),
            ("sans-serif", 14).into_font(),
        ))
        .map_err(err)?;
        return Ok(());
    }
    // Whole decades around the values, room above for the labels.
    let lo = 10f64.powf(min.log10().floor()).min(min / 2.0);
    let hi = 10f64.powf((max * 3.0).log10().ceil());
    let n = chart.groups.len();
    let mut ctx = ChartBuilder::on(area)
        .caption(&chart.title, ("sans-serif", 15).into_font())
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, (lo..hi).log_scale())
        .map_err(err)?;
    let groups = &chart.groups;
    let group_label = |x: &f64| {
        let k = x.round();
        if (x - k).abs() < 1e-6 && k >= 0.0 {
            groups.get(k as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    ctx.configure_mesh()
        .disable_x_mesh()
        .x_labels(n + 1)
        .x_label_formatter(&group_label)
        .y_label_formatter(&|v| short(*v))
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .label_style(("sans-serif", 12).into_font())
        .draw()
        .map_err(err)?;
    // A group's bars share its width among the series measured in it, so
    // a series that only some groups have leaves no gaps.
    let slot = |j: usize, g: usize| -> Option<(f64, f64)> {
        chart.series[j].values.get(g).copied().flatten()?;
        let present: Vec<usize> = (0..chart.series.len())
            .filter(|&k| chart.series[k].values.get(g).copied().flatten().is_some())
            .collect();
        let index = present.iter().position(|&k| k == j)?;
        let width = 0.8 / present.len() as f64;
        Some((g as f64 - 0.4 + index as f64 * width, width))
    };
    for (j, series) in chart.series.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        let bars = series.values.iter().enumerate().filter_map(|(g, v)| {
            let v = (*v)?;
            let (x0, width) = slot(j, g)?;
            Some(Rectangle::new(
                [(x0 + width * 0.05, lo), (x0 + width * 0.95, v.max(lo))],
                color.filled(),
            ))
        });
        ctx.draw_series(bars)
            .map_err(err)?
            .label(series.name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        if chart.value_labels {
            let style = ("sans-serif", 10)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Bottom));
            let labels = series.values.iter().enumerate().filter_map(|(g, v)| {
                let v = (*v)?;
                let (x0, width) = slot(j, g)?;
                Some(Text::new(
                    short(v),
                    (x0 + width / 2.0, v * 1.08),
                    style.clone(),
                ))
            });
            ctx.draw_series(labels).map_err(err)?;
        }
    }
    if let Some((v, name)) = &chart.reference {
        ctx.draw_series(LineSeries::new(
            [(-0.5, *v), (n as f64 - 0.5, *v)],
            BLACK.stroke_width(2),
        ))
        .map_err(err)?
        .label(name.as_str())
        .legend(|(x, y)| PathElement::new([(x, y), (x + 10, y)], BLACK.stroke_width(2)));
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 11).into_font())
        .draw()
        .map_err(err)?;
    Ok(())
}

/// A value in three significant digits at most, thousands as k and M.
fn short(v: f64) -> String {
    let (v, suffix) = if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_names_its_groups_series_and_values() {
        let dir = std::env::temp_dir().join(format!("duplex-charts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.svg");
        let chart = BarChart {
            title: "ratios".into(),
            y_label: "x".into(),
            x_label: "scenario".into(),
            groups: vec!["S1".into(), "S2".into(), "S3".into()],
            series: vec![
                Series {
                    name: "vs alpha".into(),
                    values: vec![Some(1.5), Some(0.75), None],
                },
                Series {
                    name: "vs beta".into(),
                    values: vec![Some(12.0), None, Some(0.5)],
                },
            ],
            reference: Some((1.0, "parity".into())),
            value_labels: true,
        };
        write_svg(
            &path,
            "machine, date",
            &[chart.clone(), chart],
            2,
            (500, 300),
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for text in [
            "machine, date",
            "ratios",
            "S1",
            "S2",
            "S3",
            "vs alpha",
            "vs beta",
            "parity",
            "12.0",
            "0.75",
        ] {
            assert!(
                svg.contains(&format!(">{text}<")) || svg.contains(text),
                "{text} missing"
            );
        }
        // Two panels, each with 4 bars and the legend's swatches.
        assert!(svg.matches("<rect").count() >= 8, "{svg}");
        assert!(write_svg(&path, "c", &[], 1, (10, 10)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short(0.123), "0.12");
        assert_eq!(short(12.34), "12.3");
        assert_eq!(short(152_731.0), "153k");
        assert_eq!(short(3_097_787.0), "3.10M");
    }
}
