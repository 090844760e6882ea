//! A run's metrics: `metrics.jsonl`, one JSON object per line, and
//! `loss.svg`, the loss curve.
//!
//! Train records, one per optimizer step:
//! `{"step":12,"loss":2.31,"lr":0.0002,"grad_norm":0.84,"tokens":2048,"tokens_per_s":1534.2,"elapsed_s":17.3}`
//! (`tokens`: token positions processed in the step). Eval records:
//! `{"step":50,"eval_loss":2.02}`. A loss that is not finite (a step with no
//! counted targets) is written as `null` and left out of the picture.
//!
//! On resume the log is continued: records after the resumed step (left by
//! the interrupted run) are dropped first, so the file holds each step once.
//! The picture is rewritten whole, atomically (a temporary name, then a
//! rename).

use crate::error::{Error, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const PLOT_FILE: &str = "loss.svg";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    pub step: u64,
    #[serde(with = "finite")]
    pub loss: f64,
    pub lr: f64,
    #[serde(with = "finite")]
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    #[serde(with = "finite")]
    pub eval_loss: f64,
}

/// One line of the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum Record {
    Eval(EvalRecord),
    Train(TrainRecord),
}

impl Record {
    fn step(&self) -> u64 {
        match self {
            Record::Eval(r) => r.step,
            Record::Train(r) => r.step,
        }
    }
}

/// Non-finite floats as JSON null (JSON has no NaN), and back as NaN.
mod finite {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f64(*x)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

pub struct MetricsLog {
    dir: PathBuf,
    file: File,
    train: Vec<(u64, f64)>,
    eval: Vec<(u64, f64)>,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl`: a new file, or with `resume_step` the old
    /// one cut to the records of steps ≤ it.
    pub fn open(dir: &Path, resume_step: Option<u64>) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        let mut kept = Vec::new();
        if let (Some(step), true) = (resume_step, path.exists()) {
            let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let r: Record = serde_json::from_str(line).map_err(|e| {
                    Error::format(&path, format!("line {}: not a metrics record: {e}", i + 1))
                })?;
                if r.step() <= step {
                    kept.push(r);
                }
            }
        }
        // Rewrite the kept records under a temporary name, then rename, so
        // a crash here loses nothing.
        let tmp = dir.join(format!(".{METRICS_FILE}.tmp"));
        let mut text = String::new();
        for r in &kept {
            text.push_str(&serde_json::to_string(r).expect("records serialize"));
            text.push('\n');
        }
        fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut log = MetricsLog {
            dir: dir.to_path_buf(),
            file,
            train: Vec::new(),
            eval: Vec::new(),
        };
        for r in kept {
            log.remember(&r);
        }
        Ok(log)
    }

    pub fn train(&mut self, r: TrainRecord) -> Result<()> {
        self.append(Record::Train(r))
    }

    pub fn eval(&mut self, r: EvalRecord) -> Result<()> {
        self.append(Record::Eval(r))
    }

    fn append(&mut self, r: Record) -> Result<()> {
        let mut line = serde_json::to_string(&r).expect("records serialize");
        line.push('\n');
        let path = self.dir.join(METRICS_FILE);
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&path, e))?;
        self.remember(&r);
        Ok(())
    }

    fn remember(&mut self, r: &Record) {
        match r {
            Record::Train(t) if t.loss.is_finite() => self.train.push((t.step, t.loss)),
            Record::Eval(e) if e.eval_loss.is_finite() => self.eval.push((e.step, e.eval_loss)),
            _ => {}
        }
    }

    /// Rewrites `dir/loss.svg`: train loss per step, eval loss with markers.
    /// With no finite loss yet there is nothing to draw, and no file.
    pub fn write_plot(&self) -> Result<()> {
        if self.train.is_empty() && self.eval.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(PLOT_FILE);
        let svg = self.render().map_err(|e| {
            Error::Invalid(format!(
                "{}: cannot draw the loss curve: {e}",
                path.display()
            ))
        })?;
        let tmp = self.dir.join(format!(".{PLOT_FILE}.tmp"));
        fs::write(&tmp, svg).map_err(|e| Error::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }

    fn render(&self) -> std::result::Result<String, Box<dyn std::error::Error>> {
        let all = || self.train.iter().chain(&self.eval);
        let last = all().map(|p| p.0).max().unwrap_or(1).max(1);
        let first = all().map(|p| p.0).min().unwrap_or(0).min(last - 1);
        let (lo, hi) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption("loss", ("sans-serif", 22))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(first..last, (lo - pad).max(0.0)..hi + pad)?;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc("loss")
                .draw()?;
            chart
                .draw_series(LineSeries::new(self.train.iter().copied(), &BLUE))?
                .label("train")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
            if !self.eval.is_empty() {
                chart
                    .draw_series(LineSeries::new(self.eval.iter().copied(), &RED))?
                    .label("eval")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
                chart.draw_series(self.eval.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
            }
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()?;
            root.present()?;
        }
        Ok(svg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, loss: f64) -> TrainRecord {
        TrainRecord {
            step,
            loss,
            lr: 1e-3,
            grad_norm: 0.5,
            tokens: 64,
            tokens_per_s: 100.0,
            elapsed_s: step as f64,
        }
    }

    fn lines(dir: &Path) -> Vec<String> {
        fs::read_to_string(dir.join(METRICS_FILE))
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn records_round_trip_and_resume_drops_later_steps() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(tmp.path(), None).unwrap();
        for s in 1..=6 {
            log.train(rec(s, 3.0 - s as f64 * 0.1)).unwrap();
        }
        log.eval(EvalRecord {
            step: 3,
            eval_loss: 2.5,
        })
        .unwrap();
        log.train(rec(7, f64::NAN)).unwrap();
        let l = lines(tmp.path());
        assert_eq!(l.len(), 8);
        let back: Record = serde_json::from_str(&l[0]).unwrap();
        assert_eq!(back, Record::Train(rec(1, 2.9)));
        assert!(l[6].contains("\"eval_loss\":2.5"));
        assert!(l[7].contains("\"loss\":null"), "{}", l[7]);
        let nan: Record = serde_json::from_str(&l[7]).unwrap();
        assert!(matches!(nan, Record::Train(r) if r.loss.is_nan()));

        let mut log = MetricsLog::open(tmp.path(), Some(4)).unwrap();
        assert_eq!(log.train.len(), 4);
        assert_eq!(log.eval, vec![(3, 2.5)]);
        log.train(rec(5, 1.0)).unwrap();
        let l = lines(tmp.path());
        let steps: Vec<u64> = l
            .iter()
            .map(|x| serde_json::from_str::<Record>(x).unwrap().step())
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4, 3, 5]);
        // A fresh run replaces the old log.
        MetricsLog::open(tmp.path(), None).unwrap();
        assert!(lines(tmp.path()).is_empty());
    }

    #[test]
    fn plot_is_an_svg_with_both_curves_written_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(tmp.path(), None).unwrap();
        log.write_plot().unwrap();
        assert!(!tmp.path().join(PLOT_FILE).exists(), "nothing to draw yet");
        for s in 1..=20 {
            log.train(rec(s, 5.0 / s as f64)).unwrap();
        }
        log.eval(EvalRecord {
            step: 10,
            eval_loss: 0.9,
        })
        .unwrap();
        log.write_plot().unwrap();
        let svg = fs::read_to_string(tmp.path().join(PLOT_FILE)).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("<polyline") || svg.contains("<path"));
        assert!(svg.contains("<circle"), "eval markers");
        assert!(svg.contains(">step<") || svg.contains("step"), "axis label");
        let names: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn unwritable_folder_is_an_error_with_its_path() {
        let err = MetricsLog::open(Path::new("/nonexistent/run"), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/run"), "{err}");
    }
}
