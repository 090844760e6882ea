//! A run's metrics: `metrics.jsonl`, one JSON object per line, and
//! `loss.svg`, the loss curve.
//!
//! Train records, one per optimizer step:
//! `{"step":12,"loss":2.31,"lr":0.0002,"grad_norm":0.84,"tokens":2048,"tokens_per_s":1534.2,"elapsed_s":17.3,"act_mib":85.5}`
//! (`tokens`: token positions processed in the step; `tokens_per_s`: this
//! process's rate; `elapsed_s`: training seconds since the run began, carried
//! across a resume by the checkpoint; `act_mib`: the device
//! memory the run's activations and their scratch hold, in MiB; absent from
//! older logs, read back as NaN and written back without it). Eval records:
//! `{"step":50,"eval_loss":2.02}`. JSON has no NaN or infinity: a float that
//! is not finite (the loss of a step with no counted targets, a diverged
//! gradient norm) is written as `null`, read back as NaN, and left out of
//! the picture.
//!
//! On resume the log is continued: records after the resumed step (left by
//! the interrupted run) are dropped first, so the file holds each step once;
//! a last line cut short by a crash is dropped too. The picture is rewritten
//! whole, atomically (a temporary name in the same folder, synced, then a
//! rename); with no finite loss yet there is nothing to draw and no file.

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
    #[serde(with = "finite")]
    pub lr: f64,
    #[serde(with = "finite")]
    pub grad_norm: f64,
    pub tokens: u64,
    #[serde(with = "finite")]
    pub tokens_per_s: f64,
    #[serde(with = "finite")]
    pub elapsed_s: f64,
    #[serde(
        with = "finite",
        default = "not_known",
        skip_serializing_if = "is_not_known"
    )]
    pub act_mib: f64,
}

/// A field an older log lacks: NaN, and left out when written back.
fn not_known() -> f64 {
    f64::NAN
}

fn is_not_known(x: &f64) -> bool {
    x.is_nan()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    #[serde(with = "finite")]
    pub eval_loss: f64,
}

/// One line of the log. (Untagged: a line with `eval_loss` is an eval
/// record, one with `loss` a train record.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    Eval(EvalRecord),
    Train(TrainRecord),
}

impl Record {
    pub fn step(&self) -> u64 {
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

/// Reads a `metrics.jsonl`. A last line that does not end in a newline and
/// does not parse (a write cut short by a crash) is dropped; any other bad
/// line is an error naming the file and the line.
pub fn read_log(path: &Path) -> Result<Vec<Record>> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let n = text.lines().count();
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(r) => records.push(r),
            Err(_) if i + 1 == n && !text.ends_with('\n') => {}
            Err(e) => {
                return Err(Error::format(
                    path,
                    format!("line {}: not a metrics record: {e}", i + 1),
                ))
            }
        }
    }
    Ok(records)
}

/// Writes `bytes` to `path` by way of `tmp` (same folder): written, synced,
/// renamed. On failure `tmp` is removed and `path` is untouched.
fn write_atomically(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<()> {
    let done = File::create(tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(|e| Error::io(tmp, e))
        .and_then(|_| fs::rename(tmp, path).map_err(|e| Error::io(path, e)));
    if done.is_err() {
        let _ = fs::remove_file(tmp);
    }
    done
}

/// The open log of a run: appends records to `DIR/metrics.jsonl` and keeps
/// the finite losses for `DIR/loss.svg`.
pub struct MetricsLog {
    dir: PathBuf,
    file: File,
    train: Vec<(u64, f64)>,
    eval: Vec<(u64, f64)>,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl` (the folder must exist). `None`: a new,
    /// empty log, replacing any old one. `Some(step)`: the old log cut to the
    /// records of steps ≤ `step`, in their order (a new one if there is none);
    /// their losses are remembered for the picture.
    pub fn open(dir: &Path, resume_step: Option<u64>) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        let mut kept = Vec::new();
        if let (Some(step), true) = (resume_step, path.exists()) {
            kept = read_log(&path)?;
            kept.retain(|r| r.step() <= step);
        }
        // Rewrite the kept records under a temporary name, then rename, so
        // a crash here loses nothing.
        let mut text = String::new();
        for r in &kept {
            text.push_str(&serde_json::to_string(r).expect("records serialize"));
            text.push('\n');
        }
        let tmp = dir.join(format!(".{METRICS_FILE}.tmp"));
        write_atomically(&path, &tmp, text.as_bytes())?;
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

    /// Appends a train record (one line, written through to the file).
    pub fn train(&mut self, r: TrainRecord) -> Result<()> {
        self.append(Record::Train(r))
    }

    /// Appends an eval record.
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

    /// Rewrites `dir/loss.svg` atomically: train loss per step as a line,
    /// eval loss as a line with markers, x = step, y = loss. With no finite
    /// loss yet there is nothing to draw: no file is written (an old one is
    /// left as it is) and the result is Ok.
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
        write_atomically(&path, &tmp, svg.as_bytes())
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
                .caption("training loss", ("sans-serif", 22))
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
                .position(SeriesLabelPosition::UpperRight)
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
            act_mib: 1.5,
        }
    }

    fn eval(step: u64, eval_loss: f64) -> EvalRecord {
        EvalRecord { step, eval_loss }
    }

    fn lines(dir: &Path) -> Vec<String> {
        fs::read_to_string(dir.join(METRICS_FILE))
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn steps(dir: &Path) -> Vec<u64> {
        read_log(&dir.join(METRICS_FILE))
            .unwrap()
            .iter()
            .map(Record::step)
            .collect()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    /// The `points` of the polylines drawn with `stroke`, as point counts.
    fn polylines(svg: &str, stroke: &str) -> Vec<usize> {
        svg.lines()
            .filter(|l| l.starts_with("<polyline") && l.contains(&format!("stroke=\"{stroke}\"")))
            .map(|l| {
                let pts = l.split("points=\"").nth(1).unwrap();
                pts[..pts.find('"').unwrap()].split_whitespace().count()
            })
            .collect()
    }

    #[test]
    fn records_round_trip_with_the_documented_field_names() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(tmp.path(), None).unwrap();
        let t = TrainRecord {
            step: 12,
            loss: 2.31,
            lr: 0.0002,
            grad_norm: 0.84,
            tokens: 2048,
            tokens_per_s: 1534.2,
            elapsed_s: 17.3,
            act_mib: 85.5,
        };
        log.train(t.clone()).unwrap();
        log.eval(eval(12, 2.02)).unwrap();
        let l = lines(tmp.path());
        assert_eq!(
            l,
            vec![
                r#"{"step":12,"loss":2.31,"lr":0.0002,"grad_norm":0.84,"tokens":2048,"tokens_per_s":1534.2,"elapsed_s":17.3,"act_mib":85.5}"#,
                r#"{"step":12,"eval_loss":2.02}"#,
            ]
        );
        let back = read_log(&tmp.path().join(METRICS_FILE)).unwrap();
        assert_eq!(back, vec![Record::Train(t), Record::Eval(eval(12, 2.02))]);
        // A log written before `act_mib` existed still reads: NaN, unknown.
        let old = tmp.path().join("old.jsonl");
        fs::write(
            &old,
            format!("{}\n", &l[0].replace(r#","act_mib":85.5"#, "")),
        )
        .unwrap();
        match &read_log(&old).unwrap()[..] {
            [Record::Train(r)] => assert!(r.step == 12 && r.act_mib.is_nan()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn non_finite_floats_are_null_and_read_back_as_nan() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(tmp.path(), None).unwrap();
        let mut r = rec(1, f64::NAN);
        r.grad_norm = f64::INFINITY;
        r.tokens_per_s = f64::NEG_INFINITY;
        log.train(r).unwrap();
        log.eval(eval(1, f64::NAN)).unwrap();
        let l = lines(tmp.path());
        assert!(l[0].contains(r#""loss":null"#), "{}", l[0]);
        assert!(l[0].contains(r#""grad_norm":null"#), "{}", l[0]);
        assert!(l[0].contains(r#""tokens_per_s":null"#), "{}", l[0]);
        assert_eq!(l[1], r#"{"step":1,"eval_loss":null}"#);
        match &read_log(&tmp.path().join(METRICS_FILE)).unwrap()[..] {
            [Record::Train(t), Record::Eval(e)] => {
                assert!(t.loss.is_nan() && t.grad_norm.is_nan() && t.tokens_per_s.is_nan());
                assert_eq!((t.lr, t.elapsed_s), (1e-3, 1.0));
                assert!(e.eval_loss.is_nan());
            }
            other => panic!("{other:?}"),
        }
        // Nothing finite to draw: no picture, no error.
        assert!(log.train.is_empty() && log.eval.is_empty());
        log.write_plot().unwrap();
        assert!(!tmp.path().join(PLOT_FILE).exists());
    }

    #[test]
    fn resume_drops_the_records_after_the_resumed_step() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(tmp.path(), None).unwrap();
        for s in 1..=6 {
            log.train(rec(s, 3.0 - s as f64 * 0.1)).unwrap();
            if s % 3 == 0 {
                log.eval(eval(s, 2.5 - s as f64 * 0.1)).unwrap();
            }
        }
        drop(log);
        assert_eq!(steps(tmp.path()), vec![1, 2, 3, 3, 4, 5, 6, 6]);

        let mut log = MetricsLog::open(tmp.path(), Some(4)).unwrap();
        assert_eq!(steps(tmp.path()), vec![1, 2, 3, 3, 4]);
        assert_eq!(
            log.train.iter().map(|p| p.0).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(log.eval, vec![(3, 2.2)]);
        log.train(rec(5, 1.0)).unwrap();
        assert_eq!(steps(tmp.path()), vec![1, 2, 3, 3, 4, 5]);
        assert_eq!(log.train.last(), Some(&(5, 1.0)));

        // Resuming at step 0 keeps nothing; a fresh run replaces the log.
        drop(log);
        MetricsLog::open(tmp.path(), Some(0)).unwrap();
        assert!(lines(tmp.path()).is_empty());
        let mut log = MetricsLog::open(tmp.path(), None).unwrap();
        log.train(rec(1, 1.0)).unwrap();
        drop(log);
        MetricsLog::open(tmp.path(), None).unwrap();
        assert!(lines(tmp.path()).is_empty());
        // Resuming with no log starts one.
        fs::remove_file(tmp.path().join(METRICS_FILE)).unwrap();
        MetricsLog::open(tmp.path(), Some(7)).unwrap();
        assert!(lines(tmp.path()).is_empty());
        assert_eq!(names(tmp.path()), vec![METRICS_FILE]);
    }

    #[test]
    fn resume_drops_a_torn_last_line_but_not_a_bad_one_inside() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(METRICS_FILE);
        let good = [
            r#"{"step":1,"loss":2.0,"lr":0.001,"grad_norm":1.0,"tokens":8,"tokens_per_s":1.0,"elapsed_s":1.0}"#,
            r#"{"step":2,"loss":1.5,"lr":0.001,"grad_norm":1.0,"tokens":8,"tokens_per_s":1.0,"elapsed_s":2.0}"#,
        ];
        fs::write(
            &path,
            format!("{}\n{}\n{{\"step\":3,\"lo", good[0], good[1]),
        )
        .unwrap();
        let log = MetricsLog::open(tmp.path(), Some(5)).unwrap();
        assert_eq!(lines(tmp.path()), good);
        assert_eq!(log.train, vec![(1, 2.0), (2, 1.5)]);

        fs::write(&path, format!("{}\nnot json\n{}\n", good[0], good[1])).unwrap();
        let err = MetricsLog::open(tmp.path(), Some(5))
            .err()
            .expect("a bad line inside the log is an error")
            .to_string();
        assert!(
            err.contains(METRICS_FILE) && err.contains("line 2"),
            "{err}"
        );
        // The log was left as it was.
        assert_eq!(lines(tmp.path()).len(), 3);
    }

    #[test]
    fn plot_is_an_svg_with_both_curves_written_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(tmp.path(), None).unwrap();
        log.write_plot().unwrap();
        assert!(!tmp.path().join(PLOT_FILE).exists(), "nothing to draw yet");
        for s in 1..=20 {
            let loss = if s == 7 { f64::NAN } else { 5.0 / s as f64 };
            log.train(rec(s, loss)).unwrap();
            if s % 5 == 0 {
                log.eval(eval(s, 6.0 / s as f64)).unwrap();
            }
        }
        log.eval(eval(20, f64::INFINITY)).unwrap();
        log.write_plot().unwrap();
        let svg = fs::read_to_string(tmp.path().join(PLOT_FILE)).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        // The train curve: 19 finite points (step 7 is NaN) in one line; the
        // eval curve: 4 points, a line and a marker each, plus legend swatches.
        assert!(polylines(&svg, "#0000FF").contains(&19), "{svg}");
        assert!(polylines(&svg, "#FF0000").contains(&4), "{svg}");
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // Title, axis labels and legend are text elements.
        for text in ["training loss", "step", "loss", "train", "eval"] {
            assert!(
                svg.contains(&format!(">\n{text}\n</text>")),
                "no text {text:?}"
            );
        }
        assert_eq!(names(tmp.path()), vec![PLOT_FILE, METRICS_FILE]);

        // Rewritten whole: a second call with more points replaces it.
        log.train(rec(21, 0.1)).unwrap();
        log.write_plot().unwrap();
        let again = fs::read_to_string(tmp.path().join(PLOT_FILE)).unwrap();
        assert!(polylines(&again, "#0000FF").contains(&20));
        assert_eq!(again.matches("<svg").count(), 1);
        assert_eq!(names(tmp.path()), vec![PLOT_FILE, METRICS_FILE]);
    }

    #[test]
    fn a_single_point_still_draws() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(tmp.path(), None).unwrap();
        log.eval(eval(0, 3.0)).unwrap();
        log.write_plot().unwrap();
        let svg = fs::read_to_string(tmp.path().join(PLOT_FILE)).unwrap();
        assert_eq!(svg.matches("<circle").count(), 1);
    }

    #[test]
    fn unwritable_folder_is_an_error_with_its_path() {
        let err = MetricsLog::open(Path::new("/nonexistent/run"), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/run"), "{err}");

        // The folder goes away under an open log: the picture cannot be
        // written, and the error names where.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        fs::create_dir(&dir).unwrap();
        let mut log = MetricsLog::open(&dir, None).unwrap();
        log.train(rec(1, 1.0)).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        let err = log.write_plot().err().unwrap().to_string();
        assert!(err.contains(&dir.display().to_string()), "{err}");
        assert!(!dir.exists());
    }
}
