//! Training metrics as JSONL (one record per step; evaluation fields on evaluation steps) and
//! their PNG rendering (`fathom plot RUN_DIR`).

use crate::error::{io_err, Result, TrainError};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: usize,
    /// Total objective (LM + λ/D·ΣMTP + balance).
    pub loss: f64,
    pub lm_loss: f64,
    /// Mean of the MTP losses L_k (absent without MTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtp_loss: Option<f64>,
    pub balance_loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub tokens_seen: u64,
    /// MaxVio of each MoE layer over this step's tokens (HF layer index, value).
    pub max_vio: Vec<(usize, f64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// MaxVio of each MoE layer over all validation tokens (V3's MaxVio_global).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_max_vio: Option<Vec<(usize, f64)>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_mtp_loss: Option<f64>,
    /// Validation bits per byte: val_loss / ln 2 / (UTF-8 bytes per token of the val split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_bpb: Option<f64>,
}

pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    pub fn new(path: PathBuf) -> Self {
        MetricsLog { path }
    }

    pub fn append<T: Serialize>(&self, rec: &T) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        writeln!(f, "{}", serde_json::to_string(rec).unwrap()).map_err(io_err(&self.path))
    }

    /// Drop records after `step` (a resumed run rewrites them).
    pub fn truncate_after(&self, step: usize) -> Result<()> {
        if !self.path.exists() {
            return Ok(());
        }
        let keep: Vec<serde_json::Value> = read_records(&self.path)?
            .into_iter()
            .filter(|r: &serde_json::Value| r["step"].as_u64().is_some_and(|s| s as usize <= step))
            .collect();
        let mut text = String::new();
        for r in keep {
            text.push_str(&serde_json::to_string(&r).unwrap());
            text.push('\n');
        }
        let tmp = self.path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io_err(&self.path))
    }
}

pub fn read_metrics(path: &Path) -> Result<Vec<StepRecord>> {
    read_records(path)
}

/// Every record of a metrics JSONL file, of any record type (`StepRecord`, or the post-training
/// commands' flat `{"step": …, name: value}` objects).
pub fn read_records<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| TrainError::Data {
                path: path.into(),
                msg: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

type Series = (String, Vec<(f64, f64)>);

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    series: &[Series],
    log_y: bool,
) -> std::result::Result<(), String> {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, p)| p.iter().cloned())
        .filter(|(_, y)| y.is_finite() && (!log_y || *y > 0.0))
        .collect();
    if pts.is_empty() {
        return Ok(());
    }
    let x_max = pts.iter().map(|p| p.0).fold(1.0, f64::max);
    let (mut y_min, mut y_max) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    if y_max - y_min < 1e-12 {
        y_max += 0.5 * y_max.abs().max(1e-3);
        y_min -= 0.5 * y_min.abs().max(1e-3);
    }
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60);
    let colors = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK, &YELLOW];
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("step")
                .draw()
                .map_err(|x| e(&x))?;
            for (i, (name, p)) in series.iter().enumerate() {
                let c = colors[i % colors.len()];
                let p: Vec<(f64, f64)> = p
                    .iter()
                    .cloned()
                    .filter(|(_, y)| y.is_finite() && (!log_y || *y > 0.0))
                    .collect();
                let sparse = p.len() <= 40;
                if sparse {
                    chart
                        .draw_series(p.iter().map(|&pt| Circle::new(pt, 3, c.filled())))
                        .map_err(|x| e(&x))?;
                }
                chart
                    .draw_series(LineSeries::new(p, c.stroke_width(2)))
                    .map_err(|x| e(&x))?
                    .label(name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|x| e(&x))?;
        }};
    }
    if log_y {
        draw!(builder
            .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())
            .map_err(|x| e(&x))?);
    } else {
        draw!(builder
            .build_cartesian_2d(0f64..x_max, y_min..y_max)
            .map_err(|x| e(&x))?);
    }
    Ok(())
}

/// Render `records` to a 2×2 PNG: losses, MTP/balance, lr and gradient norm, MaxVio per layer.
pub fn plot_metrics(records: &[StepRecord], out: &Path) -> Result<()> {
    register_font();
    let s = |f: &dyn Fn(&StepRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|r| f(r).map(|y| (r.step as f64, y)))
            .collect()
    };
    let mut vio_layers: Vec<usize> = records
        .iter()
        .flat_map(|r| r.max_vio.iter().map(|v| v.0))
        .collect();
    vio_layers.sort();
    vio_layers.dedup();
    let mut vio: Vec<Series> = vio_layers
        .iter()
        .map(|&l| {
            (
                format!("layer {l} (batch)"),
                s(&|r: &StepRecord| r.max_vio.iter().find(|v| v.0 == l).map(|v| v.1)),
            )
        })
        .collect();
    vio.push((
        "all layers, mean over val set".into(),
        s(&|r: &StepRecord| {
            r.val_max_vio
                .as_ref()
                .map(|v| v.iter().map(|x| x.1).sum::<f64>() / v.len().max(1) as f64)
        }),
    ));
    let root = BitMapBackend::new(out, (1400, 1000)).into_drawing_area();
    let fail = |m: String| TrainError::Other(format!("{}: {m}", out.display()));
    root.fill(&WHITE).map_err(|x| fail(x.to_string()))?;
    let areas = root.split_evenly((2, 2));
    panel(
        &areas[0],
        "loss (nats/token)",
        &[
            ("train LM".into(), s(&|r: &StepRecord| Some(r.lm_loss))),
            ("val LM".into(), s(&|r: &StepRecord| r.val_loss)),
            ("train MTP".into(), s(&|r: &StepRecord| r.mtp_loss)),
            ("val MTP".into(), s(&|r: &StepRecord| r.val_mtp_loss)),
        ],
        false,
    )
    .map_err(fail)?;
    panel(
        &areas[1],
        "validation bits per byte",
        &[("val bpb".into(), s(&|r: &StepRecord| r.val_bpb))],
        false,
    )
    .map_err(fail)?;
    panel(
        &areas[2],
        "learning rate ×1000 and gradient norm",
        &[
            ("lr×1000".into(), s(&|r: &StepRecord| Some(r.lr * 1000.0))),
            ("grad norm".into(), s(&|r: &StepRecord| Some(r.grad_norm))),
        ],
        false,
    )
    .map_err(fail)?;
    panel(&areas[3], "MaxVio per MoE layer", &vio, false).map_err(fail)?;
    root.present().map_err(|x| fail(x.to_string()))?;
    Ok(())
}

/// Render flat `{"step": N, key: value, …}` records (the post-training commands' metrics) as a grid
/// of panels, each `(title, keys)` one chart with a line per key (points where the key is present).
pub fn plot_panels(
    records: &[serde_json::Value],
    panels: &[(&str, &[&str])],
    out: &Path,
) -> Result<()> {
    register_font();
    let fail = |m: String| TrainError::Other(format!("{}: {m}", out.display()));
    let cols = 2;
    let rows = panels.len().div_ceil(cols).max(1);
    let root = BitMapBackend::new(out, (1400, 500 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| fail(x.to_string()))?;
    let areas = root.split_evenly((rows, cols));
    for ((title, keys), area) in panels.iter().zip(&areas) {
        let series: Vec<Series> = keys
            .iter()
            .map(|k| {
                let pts = records
                    .iter()
                    .filter_map(|r| Some((r["step"].as_f64()?, r.get(*k)?.as_f64()?)))
                    .collect();
                (k.to_string(), pts)
            })
            .collect();
        panel(area, title, &series, false).map_err(fail)?;
    }
    root.present().map_err(|x| fail(x.to_string()))?;
    Ok(())
}
