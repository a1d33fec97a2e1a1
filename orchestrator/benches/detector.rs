//! The dead-node check's cost at fleet scale, as the fleet actor runs it: 50,000
//! live nodes, each beating once a second (at its own phase) into its session's
//! liveness cell, and a check every 0.5 s with a 3 s heartbeat timeout (the fleet
//! benchmarks' tight lifecycle). A check visits only the nodes that came due: each
//! node about once per timeout, 50,000 visits in the six checks of 3 s (in bursts,
//! since the bench's nodes all connected at once). The figure is the time of those
//! six checks, 3 s of the fleet actor's detector work; divided by 50,000, the cost
//! of one visit. The beats themselves are written outside the timed part (the
//! stream handlers write them).
//!
//! `cargo bench -p secbeat-orchestrator --bench detector`

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant, SystemTime},
};

use criterion::{Criterion, criterion_group, criterion_main};
use secbeat_orchestrator::domain::{
    node::{NodeId, NodeInfo},
    registry::{LifecycleConfig, Registry, disruption::DisruptionConfig, liveness::Liveness},
};
use uuid::Uuid;

const NODES: u32 = 50_000;
const CHECK_EVERY: Duration = Duration::from_millis(500);
const BEAT_EVERY: Duration = Duration::from_secs(1);
/// Checks in one heartbeat timeout: one iteration.
const CHECKS_PER_ITERATION: u32 = 6;

fn detector(c: &mut Criterion) {
    let config = LifecycleConfig {
        heartbeat_timeout: Duration::from_secs(3),
        dead_node_check_interval: CHECK_EVERY,
        required_consecutive_failures: 2,
        termination_deadline: Duration::from_secs(20),
        termination_grace_period: Duration::from_secs(5),
        node_retention: Duration::from_secs(600),
        disruption: DisruptionConfig::default(),
    };
    let start = Instant::now();
    let mut registry = Registry::new(config, start, SystemTime::now());
    let mut cells: Vec<(Duration, Liveness)> = Vec::new();
    for i in 0..NODES {
        let id = NodeId(Uuid::new_v4());
        registry.connect(
            NodeInfo {
                id,
                hostname: format!("edge-{i}"),
                ip: IpAddr::V4(Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8)),
                agent_version: "bench".into(),
                labels: Default::default(),
                host: Default::default(),
            },
            start,
        );
        let phase = BEAT_EVERY.mul_f64(f64::from(i) / f64::from(NODES));
        cells.push((phase, registry.liveness(id).expect("a live session has a cell")));
    }
    registry.take_effects();

    let mut now = start;
    // Every node's latest beat before `now`, on its own phase.
    let beat = |now: Instant, cells: &[(Duration, Liveness)]| {
        let since = now.saturating_duration_since(start);
        for (phase, cell) in cells {
            let beats = since.saturating_sub(*phase).as_nanos() / BEAT_EVERY.as_nanos();
            let at = start + *phase + BEAT_EVERY * u32::try_from(beats).unwrap_or(u32::MAX);
            if at <= now {
                cell.beat(at, Some(0.3));
            }
        }
    };
    // Warm up past the first timeout, so the schedule is in its steady state.
    for _ in 0..4 * CHECKS_PER_ITERATION {
        now += CHECK_EVERY;
        beat(now, &cells);
        registry.check(now);
        registry.take_effects();
    }
    let mut group = c.benchmark_group("dead-node check");
    group.sample_size(30);
    group.bench_function("50,000 nodes, six checks: 3 s of detector work", |b| {
        b.iter_custom(|iterations| {
            let mut spent = Duration::ZERO;
            for _ in 0..iterations {
                let mut visits = 0;
                for _ in 0..CHECKS_PER_ITERATION {
                    now += CHECK_EVERY;
                    beat(now, &cells);
                    let began = Instant::now();
                    visits += black_box(registry.check(now));
                    spent += began.elapsed();
                    assert!(
                        registry.take_effects().is_empty(),
                        "no node fails: every one beats"
                    );
                }
                assert_eq!(visits, NODES as usize, "each node visited once per timeout");
            }
            spent
        })
    });
    group.finish();
}

criterion_group!(benches, detector);
criterion_main!(benches);
