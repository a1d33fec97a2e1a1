//! CPU-utilization traces as CSV (`timestamp,value`, the format of the NAB traces
//! in `data/nab`): one parser for the agent's trace replay and the orchestrator's
//! backtest.
//!
//! An optional header line, then one row per sample: the timestamp as
//! `YYYY-MM-DD HH:MM:SS` (UTC) or Unix seconds, and the value in PERCENT (0-100).
//! Rows must be in time order. Every error names its line.

use chrono::NaiveDateTime;

/// The timestamp format of the NAB traces.
pub const TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

/// One sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TracePoint {
    /// Unix seconds.
    pub t: f64,
    /// Usage as a fraction of one.
    pub usage: f64,
}

/// A malformed trace, naming the line (0: the trace as a whole).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct TraceError {
    /// 1-based line number; 0 when the problem is the whole trace.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses trace text into samples in time order (at least one).
pub fn parse(text: &str) -> Result<Vec<TracePoint>, TraceError> {
    let mut points: Vec<TracePoint> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let error = |message: String| TraceError {
            line: number,
            message,
        };
        let (stamp, value) = line
            .split_once(',')
            .ok_or_else(|| error("expected timestamp,value".into()))?;
        let (stamp, value) = (stamp.trim(), value.trim());
        let Ok(percent) = value.parse::<f64>() else {
            if points.is_empty() && index == 0 {
                continue; // the header
            }
            return Err(error(format!("value {value:?} is not a number")));
        };
        if !(0.0..=100.0).contains(&percent) {
            return Err(error(format!("value {percent} is outside 0..100 percent")));
        }
        let t = parse_time(stamp).ok_or_else(|| {
            error(format!(
                "timestamp {stamp:?} is neither YYYY-MM-DD HH:MM:SS nor Unix seconds"
            ))
        })?;
        if points.last().is_some_and(|last| t <= last.t) {
            return Err(error(format!("timestamp {stamp} is not after the previous row")));
        }
        points.push(TracePoint {
            t,
            usage: percent / 100.0,
        });
    }
    if points.is_empty() {
        return Err(TraceError {
            line: 0,
            message: "no data rows".into(),
        });
    }
    Ok(points)
}

fn parse_time(text: &str) -> Option<f64> {
    if let Ok(seconds) = text.parse::<f64>() {
        return seconds.is_finite().then_some(seconds);
    }
    let time = NaiveDateTime::parse_from_str(text, TIME_FORMAT).ok()?;
    Some(time.and_utc().timestamp() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_parse_into_fractions_on_unix_seconds() {
        let points = parse("timestamp,value\n2014-02-14 14:30:00,10\n2014-02-14 14:35:00,12.5\n").unwrap();
        assert_eq!(
            points,
            vec![
                TracePoint {
                    t: 1_392_388_200.0,
                    usage: 0.10
                },
                TracePoint {
                    t: 1_392_388_500.0,
                    usage: 0.125
                },
            ]
        );
        assert_eq!(parse("5,50\n10,60\n").unwrap()[1].t, 10.0, "Unix seconds too");
    }

    #[test]
    fn bad_rows_name_their_line() {
        let cases = [
            ("timestamp,value\n2014-02-14 14:30:00,10\nnot a line\n", 3),
            ("2014-02-14 14:30:00,10\nyesterday,5\n", 2),
            ("1,10\n2,abc\n", 2),
            ("1,10\n2,101\n", 2),
            ("1,10\n2,-1\n", 2),
            ("2,10\n1,10\n", 2),
            ("timestamp,value\n", 0),
            ("", 0),
        ];
        for (text, line) in cases {
            assert_eq!(parse(text).unwrap_err().line, line, "{text:?}");
        }
    }

    #[test]
    fn every_shipped_trace_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/nab");
        let mut parsed = 0;
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "csv") {
                let points = parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
                assert!(points.len() > 1000, "{}", path.display());
                parsed += 1;
            }
        }
        assert_eq!(parsed, 6);
    }
}
