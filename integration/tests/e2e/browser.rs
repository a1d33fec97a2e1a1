//! The console in a real headless Chromium (Debian's `chromium-headless-shell`,
//! installed by scripts/test), driven over the DevTools protocol: nodes appear, a
//! SIGKILLed agent's failure shows in the feed and the table without a reload, a
//! viewer sees no action, the keyboard opens a node, and an operator terminates a
//! node from the page.

use std::{process::Stdio, time::Duration};

use futures_util::{SinkExt, StreamExt};
use secbeat_integration::{
    Agent, FAST_CONFIG, Orchestrator, STARTUP, Sig, chromium, eventually, http_request,
};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

const OPERATOR: &str = "operator-token-0123456789";
const VIEWER: &str = "viewer-token-0123456789a";
const AGENT: &str = "agent-token-0123456789ab";

/// The DevTools endpoint's list of targets (read by its Content-Length: the
/// endpoint keeps connections open).
async fn devtools_targets(port: u16) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut reader = tokio::io::BufReader::new(stream);
    let request = format!("GET /json/list HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    reader.get_mut().write_all(request.as_bytes()).await.unwrap();
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// A headless Chromium with one page, spoken to over the DevTools protocol.
struct Browser {
    _process: tokio::process::Child,
    /// Chromium's process group (the browser and every renderer it started).
    group: nix::unistd::Pid,
    page: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // ESRCH (already gone) is fine.
        let _ = nix::sys::signal::killpg(self.group, Sig::SIGKILL);
    }
}

impl Browser {
    async fn open(url: &str) -> Self {
        let profile = tempfile::tempdir().unwrap();
        // Its own process group: Chromium's renderers outlive a killed browser
        // process, so the whole group is killed when the test drops it.
        let mut process = tokio::process::Command::new(chromium())
            .process_group(0)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--window-size=1280,1000",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let group = nix::unistd::Pid::from_raw(process.id().expect("running") as i32);
        let mut stderr = tokio::io::BufReader::new(process.stderr.take().unwrap()).lines();
        let port: u16 = tokio::time::timeout(STARTUP, async {
            while let Some(line) = stderr.next_line().await.unwrap() {
                if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                    return rest.split('/').next().unwrap().parse().unwrap();
                }
            }
            panic!("chromium exited before listening")
        })
        .await
        .expect("chromium's DevTools endpoint in time");
        tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });
        let targets = devtools_targets(port).await;
        let socket = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|target| target["type"] == "page")
            .and_then(|target| target["webSocketDebuggerUrl"].as_str())
            .unwrap()
            .to_owned();
        let (page, _) = tokio_tungstenite::connect_async(socket).await.unwrap();
        let mut browser = Self {
            _process: process,
            group,
            page,
            next_id: 0,
            _profile: profile,
        };
        browser.call("Page.enable", json!({})).await;
        browser.call("Page.navigate", json!({ "url": url })).await;
        browser
    }

    /// One DevTools call; its result (events that arrive meanwhile are skipped).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({ "id": id, "method": method, "params": params }).to_string();
        self.page.send(Message::text(request)).await.unwrap();
        loop {
            let message = tokio::time::timeout(STARTUP, self.page.next())
                .await
                .expect("a DevTools answer in time")
                .unwrap()
                .unwrap();
            let Message::Text(text) = message else { continue };
            let answer: Value = serde_json::from_str(&text).unwrap();
            if answer["id"] == id {
                assert!(answer["error"].is_null(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// Evaluates JavaScript in the page (promises awaited); its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        assert!(result["exceptionDetails"].is_null(), "{expression}: {result}");
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page (an expression that throws,
    /// say before the page has loaded, counts as not yet).
    async fn until(&mut self, what: &str, expression: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let guarded = format!(
            "(() => {{ try {{ return ({expression}) === true; }} catch (_) {{ return false; }} }})()"
        );
        // Polled: the page changes on its own (events, refreshes).
        let mut polls = tokio::time::interval(Duration::from_millis(100));
        loop {
            polls.tick().await;
            if self.eval(&guarded).await == json!(true) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page never showed {what}"
            );
        }
    }

    /// Types a token into the page's form and submits it, as a person would.
    async fn use_token(&mut self, token: &str) {
        self.eval(&format!(
            "document.getElementById('token').value = '{token}'; document.getElementById('token-form').requestSubmit(); true"
        ))
        .await;
    }

    /// Presses a key on the focused element.
    async fn press(&mut self, key: &str) {
        for kind in ["keyDown", "keyUp"] {
            self.call(
                "Input.dispatchKeyEvent",
                json!({ "type": kind, "key": key, "code": key, "windowsVirtualKeyCode": 13 }),
            )
            .await;
        }
    }
}

fn row_state(node: &str) -> String {
    format!(
        "[...document.querySelectorAll('#node-table tbody tr')].find(r => r.dataset.node === '{node}')?.cells[3].textContent"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_fleet_live_and_lets_only_an_operator_act() {
    let config = format!(
        "{FAST_CONFIG}admin_token = \"{OPERATOR}\"\nviewer_token = \"{VIEWER}\"\nagent_token = \"{AGENT}\"\n"
    );
    let orchestrator = Orchestrator::start(&config).await.unwrap();
    let env = [("SECBEAT_AGENT_TOKEN".to_owned(), AGENT.to_owned())];
    let start = |cpu: &str| {
        let source = format!("const:{cpu}");
        Agent::start_with_env(
            &orchestrator.url(),
            uuid::Uuid::new_v4(),
            &["--cpu-source", &source],
            &env,
        )
        .unwrap()
    };
    let victim = start("0.3");
    let mut keeper = start("0.6");
    let addr = orchestrator.http_addr;
    let viewer_header = format!("Bearer {VIEWER}");
    eventually(STARTUP, "both nodes connected", || async {
        let response = http_request(
            addr,
            "/api/v1/nodes?state=connected",
            &[("Authorization", &viewer_header)],
        )
        .await
        .ok()?;
        (response.json()["total"] == 2).then_some(())
    })
    .await;

    let mut browser = Browser::open(&format!("http://{addr}/")).await;
    // Without a token the API refuses, and the page says so.
    browser
        .until("the refusal", "!document.getElementById('error').hidden")
        .await;
    browser.use_token(VIEWER).await;
    browser
        .until(
            "the viewer role",
            "document.getElementById('role').textContent === 'viewer'",
        )
        .await;
    for agent in [&victim, &keeper] {
        browser
            .until(
                "both nodes",
                &format!("{} === 'connected'", row_state(&agent.id())),
            )
            .await;
    }
    browser
        .until(
            "the stream live",
            "document.getElementById('stream').textContent === 'live'",
        )
        .await;
    assert_eq!(
        browser.eval("!!document.getElementById('error').hidden").await,
        json!(true)
    );

    // A crash shows in the feed and the table, without a reload.
    browser.eval("window.marker = 'same page'; true").await;
    victim.process.signal(Sig::SIGKILL);
    let short = &victim.id()[..8];
    browser
        .until(
            "the failure in the feed",
            &format!("[...document.querySelectorAll('#events li')].some(li => li.textContent.includes('node_failed') && li.textContent.includes('{short}'))"),
        )
        .await;
    browser
        .until(
            "the failure in the table",
            &format!("{} === 'failed'", row_state(&victim.id())),
        )
        .await;
    assert_eq!(
        browser.eval("window.marker").await,
        json!("same page"),
        "no reload"
    );

    // The keyboard alone opens a node; a viewer sees no action.
    browser
        .eval(&format!(
            "[...document.querySelectorAll('#node-table tbody tr')].find(r => r.dataset.node === '{}').focus(); true",
            keeper.id()
        ))
        .await;
    browser.press("Enter").await;
    browser
        .until("the node page", "!document.getElementById('detail').hidden")
        .await;
    browser
        .until(
            "the node's events",
            "document.querySelectorAll('#detail-events li').length > 0",
        )
        .await;
    assert_eq!(
        browser
            .eval("document.querySelectorAll('#actions button').length")
            .await,
        json!(0),
        "a viewer sees no action"
    );

    // An operator terminates the node from the page, after a confirmation.
    browser.use_token(OPERATOR).await;
    browser
        .until(
            "the operator role",
            "document.getElementById('role').textContent === 'operator'",
        )
        .await;
    browser
        .until(
            "the actions",
            "[...document.querySelectorAll('#actions button')].some(b => b.textContent === 'Terminate')",
        )
        .await;
    browser
        .eval("window.asked = []; window.confirm = (question) => { window.asked.push(question); return true; }; true")
        .await;
    browser
        .eval("[...document.querySelectorAll('#actions button')].find(b => b.textContent === 'Terminate').click(); true")
        .await;
    let status = keeper.process.wait_exit(STARTUP).await.unwrap();
    assert!(
        status.success(),
        "the agent exits 0 after the page's terminate: {status:?}"
    );
    let asked = browser.eval("window.asked").await;
    assert!(asked[0].as_str().unwrap().starts_with("Terminate"), "{asked}");
    browser
        .until("the termination in the feed", "[...document.querySelectorAll('#events li')].some(li => li.textContent.includes('node_terminated'))")
        .await;
    // The token never shows on the page.
    let html = browser.eval("document.documentElement.outerHTML").await;
    assert!(!html.as_str().unwrap().contains(OPERATOR) && !html.as_str().unwrap().contains(VIEWER));
}

/// A measurement (BENCHMARKS.md, "Console"), not a check: how long the console
/// takes, from navigation, to show a first page of nodes and the fleet figures,
/// against the orchestrator at `$SECBEAT_CONSOLE_URL` (a fleet started by hand,
/// e.g. 50,000 fleetsim agents). Five fresh loads; one JSON line each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with SECBEAT_CONSOLE_URL set and --run-ignored"]
async fn console_load_time_against_a_running_fleet() {
    let url = std::env::var("SECBEAT_CONSOLE_URL").expect("SECBEAT_CONSOLE_URL");
    for run in 0..5 {
        let mut browser = Browser::open(&url).await;
        browser
            .until(
                "a page of nodes and the figures",
                "document.querySelectorAll('#node-table tbody tr').length === 50 && document.querySelectorAll('#figures dt').length > 0",
            )
            .await;
        let shown = browser.eval("performance.now()").await;
        let total = browser.eval("document.getElementById('total').textContent").await;
        println!("{}", json!({ "run": run, "shown_ms": shown, "nodes": total }));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standbys_console_says_so_and_links_to_the_leader() {
    let Some(etcd) = secbeat_integration::EtcdCluster::start(1).await else {
        eprintln!("SKIPPED: etcd is not installed (scripts/test installs it and then requires it)");
        return;
    };
    let config = format!(
        "{FAST_CONFIG}{}leader_lease_ttl = 2\netcd_request_timeout = 0.5\n",
        etcd.endpoints_toml()
    );
    let first = Orchestrator::start(&config).await.unwrap();
    let second = Orchestrator::start(&config).await.unwrap();
    let (standby, leader) = eventually(STARTUP, "one leader and one standby", || async {
        let roles = [
            http_request(first.http_addr, "/readyz", &[]).await.ok()?.status,
            http_request(second.http_addr, "/readyz", &[]).await.ok()?.status,
        ];
        match roles {
            [200, 503] => Some((&second, &first)),
            [503, 200] => Some((&first, &second)),
            _ => None,
        }
    })
    .await;
    let mut browser = Browser::open(&format!("http://{}/", standby.http_addr)).await;
    browser
        .until("the standby banner", "!document.getElementById('standby').hidden")
        .await;
    let link = browser
        .eval("document.querySelector('#standby a') && document.querySelector('#standby a').getAttribute('href')")
        .await;
    assert_eq!(link, json!(leader.url()), "the banner links to the leader");
}
