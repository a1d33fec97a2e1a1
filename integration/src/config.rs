//! The configurations the tests run the orchestrator with, and the bounds they assert.

use std::time::Duration;

/// A fast lifecycle for tests: heartbeats every 0.2 s, silence after 1 s, checks
/// every 0.2 s, failed after 2 consecutive suspect checks.
pub const FAST_CONFIG: &str = "\
heartbeat_interval = 0.2
heartbeat_timeout = 1.0
dead_node_check_interval = 0.2
required_consecutive_failures = 2
termination_deadline = 2.0
termination_grace_period = 2.0
hello_timeout = 1.0
shutdown_timeout = 3.0
";

/// The webhook signing secret the tests share between orchestrator and receiver.
pub const TEST_WEBHOOK_SECRET: &str = "whsec_c2VjYmVhdC10ZXN0LXNlY3JldC0wMTIzNDU2Nzg5";

/// [`FAST_CONFIG`] plus webhooks to `url`, signed with [`TEST_WEBHOOK_SECRET`],
/// quick retries and a short reconnect grace after restarts.
pub fn webhook_config(url: &str) -> String {
    format!(
        "{FAST_CONFIG}\
provisioning_webhook_url = \"{url}\"
webhook_secret = \"{TEST_WEBHOOK_SECRET}\"
webhook_timeout = 2.0
webhook_retry_initial = 0.1
webhook_retry_max = 0.5
restart_reconnect_grace = 2.0
mass_failure_window = 10.0
"
    )
}

/// The longest a failure may take to be declared under [`FAST_CONFIG`]: the
/// heartbeat timeout plus one check per required consecutive failure, plus the
/// check that first notices.
pub const FAST_DETECTION_BOUND: Duration = Duration::from_millis(1000 + 3 * 200);

/// Allowance for process scheduling on a loaded 2-core CI machine. Bounds are
/// asserted as `configured bound + SCHEDULING_SLACK`.
pub const SCHEDULING_SLACK: Duration = Duration::from_millis(1500);

/// Asserts that a failure was declared within [`FAST_DETECTION_BOUND`] (plus
/// [`SCHEDULING_SLACK`]) of the fault.
pub fn assert_detected_within_bound(detection: Duration) {
    assert!(
        detection <= FAST_DETECTION_BOUND + SCHEDULING_SLACK,
        "failure declared after {detection:?}, configured bound {FAST_DETECTION_BOUND:?}"
    );
}

/// How long a process may take to start and connect on a loaded CI machine.
pub const STARTUP: Duration = Duration::from_secs(10);

/// Config lines (appended to a base config) that scale down a quiet fleet
/// within about half a second: checks every 0.1 s, three low ones in a row.
pub const QUICK_SCALE_DOWN: &str = "scaling_check_interval_seconds = 0.1\nscaling_mode = \"forecast_and_scale\"\nscale_down_consecutive_checks = 3\n";

/// Agent flags that make reconnects quick in tests.
pub const FAST_RECONNECT: [&str; 4] = ["--reconnect-initial", "0.05", "--reconnect-max", "0.5"];
