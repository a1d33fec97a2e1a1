//! Writes the seed corpus of the `agent_message` fuzz target: one encoded
//! message of each kind, valid and invalid.
//! `cargo run -p secbeat-orchestrator --example fuzz_corpus -- fuzz/corpus/agent_message`

use prost::Message;
use secbeat::pb::{self, agent_message::Kind};

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus/agent_message".into());
    std::fs::create_dir_all(&dir)?;
    let sample = |usage: f64, seconds: i64| pb::CpuSample {
        usage,
        time: Some(prost_types::Timestamp { seconds, nanos: 0 }),
    };
    let seeds: Vec<(&str, Kind)> = vec![
        (
            "hello",
            Kind::Hello(pb::Hello {
                node_id: "550e8400-e29b-41d4-a716-446655440000".into(),
                hostname: "edge-1".into(),
                ip: "10.0.1.42".into(),
                agent_version: "0.1.0".into(),
                labels: [("zone".to_owned(), "a".to_owned())].into(),
                ..Default::default()
            }),
        ),
        (
            "heartbeat",
            Kind::Heartbeat(pb::Heartbeat {
                sequence: 7,
                cpu: None,
            }),
        ),
        (
            "heartbeat-cpu",
            Kind::Heartbeat(pb::Heartbeat {
                sequence: 8,
                cpu: Some(sample(0.37, 1_800_000_000)),
            }),
        ),
        (
            "heartbeat-cpu-negative",
            Kind::Heartbeat(pb::Heartbeat {
                sequence: 9,
                cpu: Some(sample(-0.5, 0)),
            }),
        ),
        (
            "cpu",
            Kind::CpuSamples(pb::CpuSamples {
                samples: vec![sample(0.42, 1_800_000_000)],
            }),
        ),
        (
            "cpu-nan",
            Kind::CpuSamples(pb::CpuSamples {
                samples: vec![sample(f64::NAN, 0)],
            }),
        ),
        (
            "cpu-skew",
            Kind::CpuSamples(pb::CpuSamples {
                samples: vec![sample(0.5, i64::MAX)],
            }),
        ),
        (
            "ack",
            Kind::TerminateAck(pb::TerminateAck {
                reason: "scale down".into(),
            }),
        ),
        (
            "goodbye",
            Kind::Goodbye(pb::Goodbye {
                reason: "é".repeat(300),
            }),
        ),
    ];
    for (name, kind) in seeds {
        let bytes = pb::AgentMessage { kind: Some(kind) }.encode_to_vec();
        std::fs::write(format!("{dir}/{name}"), bytes)?;
    }
    Ok(())
}
