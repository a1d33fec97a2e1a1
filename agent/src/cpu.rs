//! CPU usage sources, each yielding a FRACTION in `[0.0, 1.0]` of current usage.
//!
//! - `proc`: `/proc/stat` deltas between two samples (busy share of the interval,
//!   never the average since boot, SecBeat weakness 2).
//! - `const:0.85`: a fixed value, to drive a chosen load in demos and tests.
//! - `trace:FILE.csv`: replays a `timestamp,value` trace with values in percent
//!   (like `data/nab`), on its own timestamps, sped up by a factor and
//!   looped at the end.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// A `--cpu-source` value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CpuSourceError {
    /// Not one of the known forms.
    #[error("unknown cpu source {0:?}: expected proc, const:FRACTION or trace:FILE.csv")]
    Unknown(String),
    /// `const:` with a value outside `0..=1`.
    #[error("const:{0}: expected a fraction within 0..=1")]
    Const(String),
    /// The trace file could not be read.
    #[error("trace {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The trace file is malformed.
    #[error("trace {path} line {line}: {problem}")]
    Trace {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// `/proc/stat` could not be read or parsed.
    #[error("/proc/stat: {0}")]
    Proc(String),
}

/// Where CPU samples come from.
#[derive(Debug)]
pub enum CpuSource {
    /// `/proc/stat` deltas.
    Proc(ProcStat),
    /// A fixed fraction.
    Const(f64),
    /// A replayed trace.
    Trace(TraceReplay),
}

impl CpuSource {
    /// Parses a `--cpu-source` value; `speedup` applies to traces.
    pub fn parse(spec: &str, speedup: f64, now: Instant) -> Result<Self, CpuSourceError> {
        if spec == "proc" {
            return ProcStat::open().map(CpuSource::Proc);
        }
        if let Some(value) = spec.strip_prefix("const:") {
            let fraction: f64 = value
                .parse()
                .map_err(|_| CpuSourceError::Const(value.to_owned()))?;
            if !(0.0..=1.0).contains(&fraction) {
                return Err(CpuSourceError::Const(value.to_owned()));
            }
            return Ok(CpuSource::Const(fraction));
        }
        if let Some(path) = spec.strip_prefix("trace:") {
            return TraceReplay::load(Path::new(path), speedup, now).map(CpuSource::Trace);
        }
        Err(CpuSourceError::Unknown(spec.to_owned()))
    }

    /// The current usage fraction, or `None` when it cannot be measured right now.
    pub fn sample(&mut self, now: Instant) -> Option<f64> {
        match self {
            CpuSource::Proc(proc_stat) => proc_stat.sample(),
            CpuSource::Const(value) => Some(*value),
            CpuSource::Trace(trace) => Some(trace.at(now)),
        }
    }
}

/// Aggregate CPU time counters from the `cpu` line of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    /// Ticks spent doing anything but idling or waiting for IO.
    pub busy: u64,
    /// All ticks.
    pub total: u64,
}

/// Parses the aggregate `cpu` line of `/proc/stat` text.
///
/// Fields: user nice system idle iowait irq softirq steal guest guest_nice. Guest
/// time is already counted in user/nice, so it is not added again; idle and iowait
/// are not busy.
pub fn parse_proc_stat(text: &str) -> Result<CpuTimes, String> {
    let line = text
        .lines()
        .find(|line| line.starts_with("cpu "))
        .ok_or("no aggregate cpu line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse::<u64>().map_err(|_| format!("bad counter {field:?}")))
        .collect::<Result<_, _>>()?;
    if fields.len() < 4 {
        return Err(format!("{} counters, expected at least 4", fields.len()));
    }
    let counted = &fields[..fields.len().min(8)];
    let total: u64 = counted.iter().sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Ok(CpuTimes {
        busy: total - idle,
        total,
    })
}

/// Busy share between two readings; `None` when no time passed.
pub fn usage_between(earlier: CpuTimes, later: CpuTimes) -> Option<f64> {
    let total = later.total.checked_sub(earlier.total)?;
    let busy = later.busy.checked_sub(earlier.busy)?;
    if total == 0 {
        return None;
    }
    Some((busy as f64 / total as f64).clamp(0.0, 1.0))
}

/// `/proc/stat` sampler holding the previous reading.
#[derive(Debug)]
pub struct ProcStat {
    previous: CpuTimes,
}

impl ProcStat {
    fn read() -> Result<CpuTimes, CpuSourceError> {
        let text =
            fs::read_to_string("/proc/stat").map_err(|error| CpuSourceError::Proc(error.to_string()))?;
        parse_proc_stat(&text).map_err(CpuSourceError::Proc)
    }

    /// Takes the baseline reading.
    pub fn open() -> Result<Self, CpuSourceError> {
        Ok(Self {
            previous: Self::read()?,
        })
    }

    /// Usage since the previous sample.
    pub fn sample(&mut self) -> Option<f64> {
        let current = Self::read().ok()?;
        let usage = usage_between(self.previous, current);
        self.previous = current;
        usage
    }
}

/// A trace replayed on its own timestamps.
#[derive(Debug)]
pub struct TraceReplay {
    /// (seconds since the first point, fraction), ascending.
    points: Vec<(f64, f64)>,
    /// Trace seconds per real second.
    speedup: f64,
    /// Length of one loop in trace seconds (the last point holds for one median step).
    period: f64,
    started: Instant,
}

impl TraceReplay {
    /// Loads `path`; the replay starts at `now`.
    pub fn load(path: &Path, speedup: f64, now: Instant) -> Result<Self, CpuSourceError> {
        let text = fs::read_to_string(path).map_err(|source| CpuSourceError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, speedup, now).map_err(|(line, problem)| CpuSourceError::Trace {
            path: path.to_owned(),
            line,
            problem,
        })
    }

    /// Parses trace text: an optional header, then `timestamp,value` lines with
    /// `YYYY-MM-DD HH:MM:SS` (or Unix seconds) and a percentage.
    pub fn parse(text: &str, speedup: f64, now: Instant) -> Result<Self, (usize, String)> {
        if !(speedup.is_finite() && speedup > 0.0) {
            return Err((0, format!("speed-up {speedup} must be a positive number")));
        }
        let raw = secbeat::cputrace::parse(text).map_err(|error| (error.line, error.message))?;
        let origin = raw[0].t;
        let points: Vec<(f64, f64)> = raw.iter().map(|point| (point.t - origin, point.usage)).collect();
        let mut steps: Vec<f64> = points
            .windows(2)
            .map(|w| w[1].0 - w[0].0)
            .filter(|d| *d > 0.0)
            .collect();
        steps.sort_by(f64::total_cmp);
        let step = steps.get(steps.len() / 2).copied().unwrap_or(1.0);
        let period = points.last().map_or(0.0, |p| p.0) + step;
        Ok(Self {
            points,
            speedup,
            period,
            started: now,
        })
    }

    /// The trace value at real time `now`: the latest point at or before the
    /// replay position (a sampled metric holds until the next sample).
    pub fn at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.started).as_secs_f64() * self.speedup;
        let position = elapsed % self.period;
        let index = self.points.partition_point(|(t, _)| *t <= position);
        self.points[index.saturating_sub(1)].1
    }

    /// Real time for one pass over the trace.
    pub fn loop_duration(&self) -> Duration {
        Duration::from_secs_f64(self.period / self.speedup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_usage_is_the_busy_share_of_the_interval() {
        let before = parse_proc_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let after = parse_proc_stat("cpu  250 0 150 800 100 0 0 0 0 0\n").unwrap();
        // busy +200 of total +300
        assert!((usage_between(before, after).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(usage_between(after, after), None);
        assert_eq!(
            usage_between(after, before),
            None,
            "counters going back are not a sample"
        );
    }

    #[test]
    fn proc_stat_counts_iowait_as_idle_and_guest_once() {
        let times = parse_proc_stat("cpu  10 0 10 50 30 0 0 0 99 99").unwrap();
        assert_eq!(times, CpuTimes { busy: 20, total: 100 });
        assert!(parse_proc_stat("intr 1 2 3").is_err());
        assert!(parse_proc_stat("cpu  1 x 3 4").is_err());
    }

    #[test]
    fn the_real_proc_stat_parses() {
        let mut stat = ProcStat::open().unwrap();
        // A second reading right away may see no ticks; either way it is a fraction.
        if let Some(usage) = stat.sample() {
            assert!((0.0..=1.0).contains(&usage));
        }
    }

    #[test]
    fn const_and_unknown_sources() {
        let now = Instant::now();
        assert_eq!(
            CpuSource::parse("const:0.85", 1.0, now).unwrap().sample(now),
            Some(0.85)
        );
        assert!(matches!(
            CpuSource::parse("const:85", 1.0, now),
            Err(CpuSourceError::Const(_))
        ));
        assert!(matches!(
            CpuSource::parse("magic", 1.0, now),
            Err(CpuSourceError::Unknown(_))
        ));
    }

    #[test]
    fn a_nab_style_trace_replays_on_its_timestamps_sped_up_and_looped() {
        let text = "timestamp,value\n2014-02-14 14:30:00,10.0\n2014-02-14 14:35:00,50.0\n\
                    2014-02-14 14:45:00,90.0\n2014-02-14 14:50:00,70.0\n";
        let start = Instant::now();
        // 300x: one 5-minute step per real second.
        let trace = TraceReplay::parse(text, 300.0, start).unwrap();
        let at = |secs: f64| trace.at(start + Duration::from_secs_f64(secs));
        assert_eq!(at(0.0), 0.10);
        assert_eq!(at(0.99), 0.10);
        assert_eq!(at(1.0), 0.50);
        assert_eq!(
            at(2.5),
            0.50,
            "the 10-minute gap holds the last value: time, not rows"
        );
        assert_eq!(at(3.0), 0.90);
        assert_eq!(at(4.5), 0.70);
        // The last point holds for one typical (median) step: 20 min + 5 min.
        assert_eq!(trace.loop_duration(), Duration::from_secs(5));
        assert_eq!(at(5.0), 0.10, "loops after the last point's step");
    }

    #[test]
    fn bad_traces_name_the_line() {
        let now = Instant::now();
        let error = TraceReplay::parse("timestamp,value\n2014-02-14 14:30:00,10\nnot a line\n", 1.0, now)
            .unwrap_err();
        assert_eq!(error.0, 3);
        let error = TraceReplay::parse("2014-02-14 14:30:00,10\nyesterday,5\n", 1.0, now).unwrap_err();
        assert_eq!(error.0, 2);
        assert!(TraceReplay::parse("timestamp,value\n", 1.0, now).is_err());
        assert!(TraceReplay::parse("1,1\n", 0.0, now).is_err());
    }

    #[test]
    fn the_shipped_nab_traces_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/nab");
        let entries = fs::read_dir(&dir).unwrap_or_else(|error| panic!("{}: {error}", dir.display()));
        let now = Instant::now();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "csv") {
                let trace = TraceReplay::load(&path, 300.0, now).unwrap();
                assert!(trace.points.len() > 100, "{}", path.display());
                assert!(trace.points.iter().all(|(_, v)| (0.0..=1.0).contains(v)));
            }
        }
    }
}
