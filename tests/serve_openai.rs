//! `wordloom serve` driven end to end by the official `openai` Python client
//! (tests/clients/openai_e2e.py), plus raw-HTTP checks of auth, /health and /metrics.
//!
//! The client is installed on first use into a virtual environment under the project's
//! git-ignored cache, `.cache/pyclients` (`python3 -m venv`, then `pip install openai`), or, where
//! Python lacks the venv module, with `pip install --target .cache/pyclients/site`. Later runs
//! reuse it. This needs `python3` and, the first time, the package registry.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------------ the server

/// A running `wordloom serve`, killed when dropped (also when an assertion fails).
struct Server {
    child: Child,
    port: u16,
    /// Everything the server wrote on stderr, for failure messages.
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let r = root();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wordloom"));
        cmd.arg("serve")
            .arg("-m")
            .arg(r.join("tests/fixtures/tiny-llama"))
            .arg("--embedding-model")
            .arg(r.join("tests/fixtures/tiny-bert-base"))
            .args(["--host", "127.0.0.1", "--port", "0", "--threads", "2"])
            .args(extra)
            // A key in the developer's environment would turn auth on for every test.
            .env_remove("WORDLOOM_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning wordloom serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<u16>();
        {
            let log = log.clone();
            // Reads until the pipe closes, so the server never blocks on a full stderr.
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.strip_prefix("listening on http://") {
                        let port = rest.rsplit(':').next().and_then(|p| p.trim().parse().ok());
                        if let (Some(port), Some(tx)) = (port, tx.take()) {
                            let _ = tx.send(port);
                        }
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let mut server = Server {
            child,
            port: 0,
            log,
        };
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(port) => server.port = port,
            Err(_) => panic!(
                "the server did not report its address (exit status {:?}); stderr:\n{}",
                server.child.try_wait().ok().flatten(),
                server.log()
            ),
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Run the client script against this server; panic with its output unless it exits 0.
    fn run_script(&self, extra: &[&str]) -> String {
        let py = python_client();
        let mut cmd = Command::new(&py.interpreter);
        cmd.arg(root().join("tests/clients/openai_e2e.py"))
            .arg("--base-url")
            .arg(self.url("/v1"))
            .args(extra)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            // httpx honours proxy variables; the server is local.
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost");
        if let Some(path) = &py.pythonpath {
            cmd.env("PYTHONPATH", path);
        }
        let start = Instant::now();
        let out = cmd.output().expect("running tests/clients/openai_e2e.py");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "openai_e2e.py {extra:?} failed ({}):\n{text}\n--- server stderr ---\n{}",
            out.status,
            self.log()
        );
        eprintln!(
            "openai_e2e.py {extra:?} passed in {:.1}s:\n{text}",
            start.elapsed().as_secs_f64()
        );
        text
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ the Python client

struct PyClient {
    interpreter: PathBuf,
    /// Set when the client was installed with `pip --target` instead of into a venv.
    pythonpath: Option<PathBuf>,
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn imports_openai(interpreter: &Path, pythonpath: Option<&Path>) -> bool {
    let mut cmd = Command::new(interpreter);
    cmd.args(["-c", "import openai"]);
    if let Some(p) = pythonpath {
        cmd.env("PYTHONPATH", p);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `openai` package, installed into `.cache/pyclients` on first use.
fn python_client() -> &'static PyClient {
    static CLIENT: OnceLock<PyClient> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let dir = root().join(".cache/pyclients");
        let venv_python = if cfg!(windows) {
            dir.join("Scripts/python.exe")
        } else {
            dir.join("bin/python")
        };
        let site = dir.join("site");
        let python3 = PathBuf::from("python3");
        // Already there?
        if venv_python.exists() && imports_openai(&venv_python, None) {
            return PyClient {
                interpreter: venv_python,
                pythonpath: None,
            };
        }
        if site.exists() && imports_openai(&python3, Some(&site)) {
            return PyClient {
                interpreter: python3,
                pythonpath: Some(site),
            };
        }
        std::fs::create_dir_all(root().join(".cache")).expect("creating .cache");
        let start = Instant::now();
        // A virtual environment, where Python has the venv module (with ensurepip).
        let mut notes = String::new();
        if !venv_python.exists() {
            let out = run(Command::new(&python3).args(["-m", "venv"]).arg(&dir));
            if !out.status.success() {
                notes += &format!("python3 -m venv: {}\n", describe(&out));
            }
        }
        if venv_python.exists() {
            let out =
                run(Command::new(&venv_python).args(["-m", "pip", "install", "--quiet", "openai"]));
            if out.status.success() && imports_openai(&venv_python, None) {
                eprintln!(
                    "installed the openai client into {} in {:.0}s",
                    dir.display(),
                    start.elapsed().as_secs_f64()
                );
                return PyClient {
                    interpreter: venv_python,
                    pythonpath: None,
                };
            }
            notes += &format!("pip install into the venv: {}\n", describe(&out));
        }
        // No usable venv: install next to it and point PYTHONPATH there.
        let out = run(Command::new(&python3)
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(&site)
            .arg("openai"));
        assert!(
            out.status.success() && imports_openai(&python3, Some(&site)),
            "cannot install the openai Python client (needs python3 with venv or pip, and the \
             package registry):\n{notes}python3 -m pip install --target: {}",
            describe(&out)
        );
        eprintln!(
            "installed the openai client into {} in {:.0}s",
            site.display(),
            start.elapsed().as_secs_f64()
        );
        PyClient {
            interpreter: python3,
            pythonpath: Some(site),
        }
    })
}

// ------------------------------------------------------------------ raw HTTP

/// Status and body of a GET, 4xx/5xx included.
fn get(url: &str, key: Option<&str>) -> (u16, String) {
    let mut req = ureq::get(url).timeout(Duration::from_secs(60));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let response = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    let status = response.status();
    let mut body = String::new();
    response
        .into_reader()
        .read_to_string(&mut body)
        .expect("reading the body");
    (status, body)
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// `{"error": {"message", "type", "param", "code"}}` as OpenAI sends it.
fn assert_openai_error(body: &str, kind: &str, code: Option<&str>) {
    let v = json(body);
    let err = &v["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without a message: {body}"
    );
    assert_eq!(err["type"], kind, "error type in {body}");
    assert!(
        err.get("param").is_some(),
        "error without a param field: {body}"
    );
    assert_eq!(err["code"].as_str(), code, "error code in {body}");
}

/// The value of an unlabelled Prometheus sample, or of the labelled one given in full.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

// ------------------------------------------------------------------ tests

#[test]
fn openai_python_client_end_to_end() {
    let start = Instant::now();
    python_client();
    let server = Server::start(&[]);

    let (status, body) = get(&server.url("/health"), None);
    assert_eq!(status, 200, "/health: {body}");
    assert_eq!(json(&body)["status"], "ok", "/health: {body}");

    let (status, body) = get(&server.url("/v1/models"), None);
    assert_eq!(status, 200, "/v1/models: {body}");
    let models = json(&body);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data list")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"tiny-llama") && ids.contains(&"tiny-bert-base"),
        "/v1/models: {body}"
    );

    let output = server.run_script(&[]);
    assert!(output.contains("passed, 0 failed"), "{output}");

    // The metrics saw the script's traffic.
    let (status, text) = get(&server.url("/metrics"), None);
    assert_eq!(status, 200, "/metrics: {text}");
    for (sample, at_least) in [
        (
            "wordloom_requests_total{route=\"/v1/chat/completions\",status=\"200\"}",
            10.0,
        ),
        (
            "wordloom_requests_total{route=\"/v1/chat/completions\",status=\"400\"}",
            1.0,
        ),
        (
            "wordloom_requests_total{route=\"/v1/chat/completions\",status=\"404\"}",
            1.0,
        ),
        (
            "wordloom_requests_total{route=\"/v1/completions\",status=\"200\"}",
            5.0,
        ),
        (
            "wordloom_requests_total{route=\"/v1/embeddings\",status=\"200\"}",
            3.0,
        ),
        ("wordloom_prompt_tokens_total", 100.0),
        ("wordloom_generated_tokens_total", 50.0),
    ] {
        let value = metric(&text, sample).unwrap_or_else(|| panic!("no {sample} in:\n{text}"));
        assert!(value >= at_least, "{sample} = {value}, want >= {at_least}");
    }

    // Unknown routes answer in OpenAI's error shape.
    let (status, body) = get(&server.url("/v1/no-such-route"), None);
    assert_eq!(status, 404, "{body}");
    assert_openai_error(&body, "invalid_request_error", None);

    eprintln!("end-to-end test took {:.1}s", start.elapsed().as_secs_f64());
}

#[test]
fn openai_python_client_with_api_key() {
    python_client();
    let server = Server::start(&["--api-key", "sekrit"]);

    // Wrong key: the client raises AuthenticationError on every route.
    server.run_script(&["--expect-auth-error", "--api-key", "wrong"]);
    // Right key: a chat call goes through.
    server.run_script(&["--smoke", "--api-key", "sekrit"]);

    for key in [None, Some("wrong"), Some("sekri"), Some("sekrit2")] {
        let (status, body) = get(&server.url("/v1/models"), key);
        assert_eq!(status, 401, "/v1/models with key {key:?}: {body}");
        assert_openai_error(&body, "authentication_error", Some("invalid_api_key"));
    }
    let (status, body) = get(&server.url("/v1/models"), Some("sekrit"));
    assert_eq!(status, 200, "/v1/models with the key: {body}");
    assert!(body.contains("tiny-llama"), "{body}");

    // Health and metrics stay open, for load balancers and scrapers.
    let (status, body) = get(&server.url("/health"), None);
    assert_eq!(status, 200, "/health without a key: {body}");
    let (status, body) = get(&server.url("/metrics"), None);
    assert_eq!(status, 200, "/metrics without a key: {body}");
    assert!(
        body.contains("wordloom_requests_total{route=\"/v1/models\",status=\"401\"}"),
        "refused requests are not counted:\n{body}"
    );
}

/// One HTTP/1.1 response read off a raw connection: status code, lower-cased head, body.
/// `Err` when the server closes the connection before a whole response.
fn read_response(stream: &mut TcpStream) -> Result<(u16, String, Vec<u8>), String> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut buf) {
            Ok(0) => return Err(format!("connection closed after {data:?}")),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("{e} after {data:?}")),
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head}"))?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap_or(0));
    while data.len() < head_end + length {
        match stream.read(&mut buf) {
            Ok(0) => return Err("connection closed inside the body".into()),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok((status, head, data[head_end..head_end + length].to_vec()))
}

/// A request refused early (bad key, unknown route, wrong method) still has its body read, so the
/// keep-alive connection stays usable: clients such as `openai` reuse connections, and a dropped
/// one surfaces as "Server disconnected without sending a response".
#[test]
fn unauthorized_post_keeps_the_connection_usable() {
    let server = Server::start(&["--api-key", "sekrit"]);
    let body = br#"{"model":"tiny-llama","prompt":"x","max_tokens":2}"#;
    let mut failures = Vec::new();
    for (method, path, key, want) in [
        ("POST", "/v1/completions", "wrong", 401),
        ("POST", "/v1/no-such-route", "sekrit", 404),
        ("PUT", "/v1/completions", "sekrit", 405),
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).expect("connecting");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // Headers and body together, as clients send them.
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let (status, head, _) = read_response(&mut s).expect("the first response");
        assert_eq!(status, want, "{method} {path}: {head}");
        if head.contains("connection: close") {
            continue;
        }
        s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        match read_response(&mut s) {
            Ok((200, _, _)) => {}
            Ok((status, head, _)) => failures.push(format!(
                "{method} {path}: the next request on the connection got {status}: {head}"
            )),
            Err(e) => failures.push(format!(
                "{method} {path} answered {want} without `Connection: close`, then the next \
                 request on the connection failed: {e}"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
