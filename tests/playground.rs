//! The chat playground at `/` in a real browser: headless Chromium loads the page from
//! `wordloom serve` (SmolLM2), a question is typed and sent through the page's own form, and the
//! answer must arrive streamed (several partial texts seen in the page before the final one) and
//! be right. Chromium is driven over the DevTools protocol (a WebSocket); it comes from
//! `scripts/fetch_chromium.py` (installed Debian chromium, or Debian's headless shell fetched into
//! the git-ignored cache the first time).

mod common;

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{smollm2_path, start};
use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

fn chromium_path() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(root.join("scripts/fetch_chromium.py"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running scripts/fetch_chromium.py");
    assert!(out.status.success(), "scripts/fetch_chromium.py failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A headless Chromium with a fresh profile, killed when dropped.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    port: u16,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn launch(url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        // The flags keep a root, offline, GPU-less machine quiet: no sandbox (root), no
        // background connections to a network that refuses them.
        let child = Command::new(chromium_path())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        // Chromium writes the port it chose into the profile once DevTools listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(60);
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.parse().ok()))
            {
                break port;
            }
            assert!(Instant::now() < deadline, "chromium never opened DevTools");
            std::thread::sleep(Duration::from_millis(100));
        };
        Browser {
            child,
            _profile: profile,
            port,
        }
    }

    /// A DevTools session on the page showing `url`.
    fn page(&self, url: &str) -> Page {
        let list: Value = ureq::get(&format!("http://127.0.0.1:{}/json/list", self.port))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        let target = list
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page" && t["url"].as_str().unwrap_or("").starts_with(url))
            .unwrap_or_else(|| panic!("no page for {url} in {list}"));
        let ws_url = target["webSocketDebuggerUrl"].as_str().unwrap();
        let (socket, _) = tungstenite::connect(ws_url).expect("DevTools WebSocket");
        if let MaybeTlsStream::Plain(stream) = socket.get_ref() {
            stream
                .set_read_timeout(Some(Duration::from_secs(300)))
                .unwrap();
        }
        Page { socket, next_id: 1 }
    }
}

struct Page {
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Page {
    /// Evaluates a JavaScript expression in the page, awaiting it if it is a promise, and returns
    /// its value as JSON.
    fn evaluate(&mut self, expression: &str) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": { "expression": expression, "awaitPromise": true, "returnByValue": true },
        });
        self.socket
            .send(Message::text(request.to_string()))
            .unwrap();
        loop {
            let message = self.socket.read().expect("DevTools reply");
            let Message::Text(text) = message else {
                continue;
            };
            let reply: Value = serde_json::from_str(&text).unwrap();
            if reply["id"] != id {
                continue; // an event
            }
            let result = &reply["result"];
            assert!(
                reply.get("error").is_none() && result.get("exceptionDetails").is_none(),
                "{expression} failed: {reply}"
            );
            return result["result"]["value"].clone();
        }
    }
}

/// Types the question into the page's form, presses Send, and records every text the answer
/// element shows until the page marks it done (or shows an error).
const ASK: &str = r#"(async () => {
  const log = document.getElementById("log");
  const seen = [];
  new MutationObserver(() => {
    const answer = log.querySelector(".assistant");
    if (answer && answer.textContent && seen[seen.length - 1] !== answer.textContent) {
      seen.push(answer.textContent);
    }
  }).observe(log, { subtree: true, childList: true, characterData: true });
  document.getElementById("question").value = "What is the capital of France?";
  document.getElementById("temperature").value = "0";
  document.getElementById("max_tokens").value = "32";
  document.getElementById("send").click();
  const deadline = Date.now() + 240000;
  for (;;) {
    const answer = log.querySelector(".assistant");
    const error = document.getElementById("error").textContent;
    if (error) return { error, seen };
    if (answer && answer.dataset.done === "true") {
      return { user: log.querySelector(".user").textContent, answer: answer.textContent, seen };
    }
    if (Date.now() > deadline) return { error: "no answer within 240 s", seen };
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
})()"#;

#[test]
fn playground_page_streams_an_answer_in_headless_chromium() {
    let model = smollm2_path();
    let server = start(&["-m", model.to_str().unwrap()]);
    let url = format!("{}/", server.base);
    let browser = Browser::launch(&url);
    let mut page = browser.page(&url);

    let deadline = Instant::now() + Duration::from_secs(60);
    // The tab may still show its first empty document while the page loads.
    let loaded = format!("location.href === {url:?} && document.readyState === 'complete'");
    while page.evaluate(&loaded) != true {
        assert!(
            Instant::now() < deadline,
            "the playground never finished loading"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(page.evaluate("document.title"), "wordloom playground");

    let result = page.evaluate(ASK);
    eprintln!("{result}");
    assert!(
        result.get("error").is_none(),
        "the page showed an error: {result}"
    );
    assert_eq!(result["user"], "You: What is the capital of France?");
    let answer = result["answer"].as_str().unwrap();
    assert!(answer.contains("Paris"), "answer: {answer:?}");
    // Streamed: the answer grew in the page through several partial texts, each a prefix of the
    // final one, not one late block of text.
    let seen: Vec<&str> = result["seen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(
        seen.len() >= 3,
        "only {} partial texts: {seen:?}",
        seen.len()
    );
    assert!(
        seen.iter().all(|s| answer.starts_with(s)),
        "{seen:?} vs {answer:?}"
    );
    assert_eq!(*seen.last().unwrap(), answer);
}
