//! The web pages in a real browser: Debian's chromium, headless, driven over WebDriver
//! (chromedriver) on three real peers on 127.0.91.x with their HTTPS admin ports.
//!
//! Log in; change `sip.domains` on a subordinate's Configuration page and see it on peer 3's;
//! kill -9 peer 2 and watch the open Overview and Alarms pages turn it red with 20004 without
//! a reload; a wrong password is refused; a change without the CSRF token is refused; a page
//! without a session goes to the login form.

mod harness;

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use harness::{addr, wait_for, TestCluster, BIN};

const NET: u8 = 91;
const PASSWORD: &str = "correct horse battery";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver on a loopback port, stopped by its PID.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_driver() -> Driver {
    assert!(
        std::path::Path::new(CHROMEDRIVER).exists(),
        "{CHROMEDRIVER} is missing: install Debian's chromium and chromium-driver (.ci/run does)"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromedriver");
    let driver = Driver {
        child,
        port,
        _profile: tempfile::tempdir().unwrap(),
    };
    wait_for(20, "chromedriver to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    driver
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    // The flags the machine's notes give for a closed network: no background fetches.
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-renderer-backgrounding", "--disable-background-timer-throttling",
                "--window-size=1280,900",
                format!("--user-data-dir={}", driver._profile.path().display()),
            ],
        }),
    );
    // The lab CA is not in the browser's store; the certificate itself is tested elsewhere.
    caps.insert("acceptInsecureCerts".into(), serde_json::Value::Bool(true));
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session with chromium")
}

fn base(k: usize) -> String {
    format!("https://{}:8443", addr(NET, k))
}

fn set_password(c: &TestCluster, k: usize) {
    let mut child = Command::new(BIN)
        .arg("--node")
        .arg(&c.peers[k - 1].dir)
        .args(["admin", "passwd", "admin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    assert!(child.wait().unwrap().success(), "admin passwd on peer {k}");
}

/// Waits (polling the page as it is, no reload) until `cond` holds.
async fn until<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn text(b: &Client, css: &str) -> String {
    match b.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// With CAUSEWAY_SCREENSHOTS=DIR, saves the page as DIR/<name>.png (to look at the pages).
async fn screenshot(b: &Client, name: &str) {
    if let Ok(dir) = std::env::var("CAUSEWAY_SCREENSHOTS") {
        let png = b.screenshot().await.unwrap();
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).unwrap();
    }
}

/// Replaces the text of the field `css` with `text`.
async fn fill(b: &Client, css: &str, text: &str) {
    let field = b.find(Locator::Css(css)).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(text).await.unwrap();
}

/// What a save said, once its answer is shown (the click may return before).
async fn save_answer(b: &Client) -> String {
    until(15, "the answer to the save", || async {
        !b.find_all(Locator::Css("p.saved, p.error"))
            .await
            .unwrap_or_default()
            .is_empty()
    })
    .await;
    text(b, "p.saved").await
}

async fn click(b: &Client, css: &str) {
    b.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn log_in(b: &Client, k: usize, password: &str) {
    b.goto(&format!("{}/login", base(k))).await.unwrap();
    fill(b, "input[name=user]", "admin").await;
    fill(b, "input[name=password]", password).await;
    click(b, "form button[type=submit]").await;
    // The click may return before the answer is shown: wait for the next page, or for the
    // login form's refusal.
    until(10, "the answer to the login form", || async {
        let away = b.current_url().await.is_ok_and(|u| u.path() != "/login");
        away || !b
            .find_all(Locator::Css("p.error"))
            .await
            .unwrap_or_default()
            .is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_the_cluster_from_the_pages_in_a_real_browser() {
    let mut cluster = TestCluster::start(NET, 3, "Permissive", |k, config, _, _| {
        config.push_str(&format!(
            "\n[admin]\nhttps_listen = \"{}:8443\"\n",
            addr(NET, k)
        ));
    });
    wait_for(60, "the three peers to form a cluster", || cluster.formed());
    for k in 1..=3 {
        set_password(&cluster, k);
    }
    let driver = start_driver();
    let b = browser(&driver).await;

    // A page without a session goes to the login form.
    b.goto(&format!("{}/ui/overview", base(1))).await.unwrap();
    let url = b.current_url().await.unwrap();
    assert_eq!(url.path(), "/login", "without a session: {url}");

    // A wrong password is refused, with the reason, and gives no session.
    log_in(&b, 1, "not the password").await;
    assert_eq!(b.current_url().await.unwrap().path(), "/login");
    let refusal = text(&b, "p.error").await;
    assert!(
        refusal.contains("wrong user name or password"),
        "{refusal:?}"
    );
    b.goto(&format!("{}/ui/overview", base(1))).await.unwrap();
    assert_eq!(b.current_url().await.unwrap().path(), "/login");

    // The right one opens the Overview, which lists the three peers up.
    log_in(&b, 1, PASSWORD).await;
    assert_eq!(b.current_url().await.unwrap().path(), "/ui/overview");
    for k in 1..=3 {
        let row = b.find(Locator::Css(&format!("tr#peer-{k}"))).await.unwrap();
        assert_eq!(row.attr("class").await.unwrap().as_deref(), Some("up"));
    }

    screenshot(&b, "overview").await;
    b.goto(&format!("{}/ui/clustering", base(1))).await.unwrap();
    screenshot(&b, "clustering").await;
    b.set_window_size(390, 844).await.unwrap();
    screenshot(&b, "clustering-phone").await;
    b.set_window_size(1280, 900).await.unwrap();

    // A change on a subordinate's Configuration page goes to every peer.
    log_in(&b, 2, PASSWORD).await;
    b.goto(&format!("{}/ui/configuration?filter=sip.domains", base(2)))
        .await
        .unwrap();
    fill(
        &b,
        "form.item input[name=value][aria-label='sip.domains']",
        "web.example.com",
    )
    .await;
    click(&b, "tr[id='item-sip.domains'] button[value=set]").await;
    let saved = save_answer(&b).await;
    assert!(
        saved.contains("sip.domains set to web.example.com"),
        "{saved:?}"
    );
    log_in(&b, 3, PASSWORD).await;
    until(
        20,
        "peer 3's Configuration page to show the new sip.domains",
        || async {
            b.goto(&format!("{}/ui/configuration?filter=sip.domains", base(3)))
                .await
                .unwrap();
            match b
                .find(Locator::Css("input[aria-label='sip.domains']"))
                .await
            {
                Ok(e) => e.prop("value").await.ok().flatten().as_deref() == Some("web.example.com"),
                Err(_) => false,
            }
        },
    )
    .await;

    // A change posted without the session's CSRF token is refused and changes nothing.
    b.goto(&format!("{}/ui/overview", base(3))).await.unwrap();
    let status = b
        .execute_async(
            "const done = arguments[0];
             fetch('/ui/configuration', {method: 'POST', body: new URLSearchParams(
                 {path: 'sip.domains', value: 'forged.example.com', action: 'set'})})
               .then(r => done(r.status), e => done(String(e)));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(status, serde_json::json!(403));
    assert_eq!(
        cluster.get(3, "sip.domains").as_deref(),
        Some("web.example.com")
    );

    // The Overview and Alarms pages of peer 1, open in two windows, turn peer 2 red with
    // 20004 by themselves when it is killed.
    b.goto(&format!("{}/ui/overview", base(1))).await.unwrap();
    let overview = b.window().await.unwrap();
    let alarms = b.new_window(true).await.unwrap();
    b.switch_to_window(alarms.handle.clone()).await.unwrap();
    b.goto(&format!("{}/ui/alarms", base(1))).await.unwrap();
    assert!(b
        .find_all(Locator::Css("tr.alarm[data-id='20004']"))
        .await
        .unwrap()
        .is_empty());
    cluster.kill9(2);
    until(60, "alarm 20004 on the open Alarms page", || async {
        !b.find_all(Locator::Css("tr.alarm[data-id='20004']"))
            .await
            .unwrap_or_default()
            .is_empty()
    })
    .await;
    screenshot(&b, "alarms").await;
    b.switch_to_window(overview).await.unwrap();
    until(
        30,
        "peer 2 red and 20004 on the open Overview page",
        || async {
            let down = match b.find(Locator::Css("tr#peer-2")).await {
                Ok(row) => row.attr("class").await.ok().flatten().as_deref() == Some("down"),
                Err(_) => false,
            };
            down && !b
                .find_all(Locator::Css("tr.alarm[data-id='20004']"))
                .await
                .unwrap_or_default()
                .is_empty()
        },
    )
    .await;
    assert_eq!(b.current_url().await.unwrap().path(), "/ui/overview");
    screenshot(&b, "overview-peer2-down").await;
    b.goto(&format!("{}/ui/configuration", base(1)))
        .await
        .unwrap();
    screenshot(&b, "configuration").await;

    // With the primary (peer 1) up and peer 2 down, the Clustering form moves the
    // configuration primary to peer 3, as `xcommand SetPrimary 3` does.
    b.goto(&format!("{}/ui/clustering", base(1))).await.unwrap();
    fill(&b, "input[name=primary]", "3").await;
    click(&b, "form.seed button[type=submit]").await;
    let saved = save_answer(&b).await;
    assert!(
        saved.contains("Peer 3 is the configuration primary"),
        "{saved:?}"
    );
    let primary_of = |k| {
        cluster
            .xstatus(k, "cluster")
            .map(|s| s["configuration_primary"].clone())
    };
    assert_eq!(primary_of(1), Some(serde_json::json!(3)));
    assert_eq!(primary_of(3), Some(serde_json::json!(3)));

    // Logging out ends the session.
    click(&b, "form.logout button").await;
    b.goto(&format!("{}/ui/alarms", base(1))).await.unwrap();
    assert_eq!(b.current_url().await.unwrap().path(), "/login");
    b.close().await.unwrap();
}
