//! `wiremesh ui` in a real headless browser (Debian's chromium, driven through
//! chromedriver's WebDriver protocol): the open page shows a node joining and,
//! when its lease ends, leaving, without a reload.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::Mesh;
use wiremesh_testkit::{require_root, require_tool, wait_until};

/// A free TCP port on loopback.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One WebDriver call: `method path` with a JSON body; returns the reply's `value`.
fn webdriver(port: u16, method: &str, path: &str, body: &Value) -> Value {
    let body = body.to_string();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("chromedriver");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // chromedriver keeps the connection open: read exactly Content-Length bytes.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("chromedriver reply");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    reader
        .read_exact(&mut body)
        .expect("chromedriver reply body");
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    value["value"].clone()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn topology_page_shows_a_node_joining_and_leaving() {
    if !require_root() || !require_tool("chromium") || !require_tool("chromedriver") {
        return;
    }
    let mut mesh = Mesh::new("location", false);
    let a1 = mesh.add_node("a1", "site-a", true);
    let b1 = mesh.add_node("b1", "site-b", true);
    mesh.start(a1);
    mesh.start(b1);

    let ui_port = free_port();
    let _ui = Killed(
        Command::new(env!("CARGO_BIN_EXE_wiremesh"))
            .args([
                "ui",
                "--registry",
                &mesh.registry(),
                "--cluster",
                &mesh.cluster,
            ])
            .args(["--listen", &format!("127.0.0.1:{ui_port}")])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let driver_port = free_port();
    let _driver = Killed(
        Command::new("chromedriver")
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(
        ("127.0.0.1", driver_port)
    )
    .is_ok()
        && TcpStream::connect(("127.0.0.1", ui_port)).is_ok()));
    let profile = tempfile::tempdir().unwrap();
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        &format!("--user-data-dir={}", profile.path().display()),
    ];
    let session = webdriver(
        driver_port,
        "POST",
        "/session",
        &json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}}}}),
    );
    let id = session["sessionId"]
        .as_str()
        .expect("a browser session")
        .to_owned();
    webdriver(
        driver_port,
        "POST",
        &format!("/session/{id}/url"),
        &json!({"url": format!("http://127.0.0.1:{ui_port}/")}),
    );
    let shows = |node: &str| {
        let script = format!("return document.getElementById('node-{node}') !== null");
        webdriver(
            driver_port,
            "POST",
            &format!("/session/{id}/execute/sync"),
            &json!({"script": script, "args": []}),
        ) == json!(true)
    };
    assert!(
        wait_until(Duration::from_secs(15), || shows("a1") && shows("b1")),
        "the page never showed a1 and b1"
    );
    assert!(!shows("c1"));

    let c1 = mesh.add_node("c1", "site-c", true);
    mesh.start(c1);
    assert!(
        wait_until(Duration::from_secs(15), || shows("c1")),
        "the page did not show c1 joining"
    );
    let leaders = webdriver(
        driver_port,
        "POST",
        &format!("/session/{id}/execute/sync"),
        &json!({"script": "return document.querySelectorAll('.node.leader').length", "args": []}),
    );
    assert_eq!(leaders, json!(3), "one leader per location");

    // c1's agent dies; its lease (3 s) ends and the page drops it.
    let mut agent = mesh.nodes[c1].agent.take().unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || !shows("c1")),
        "the page still shows c1 after it left"
    );
    webdriver(driver_port, "DELETE", &format!("/session/{id}"), &json!({}));
}
