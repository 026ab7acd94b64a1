//! Chat and text completions answered by a remote OpenAI-compatible API: the request is checked,
//! its `model` replaced by the remote model's name, and the answer relayed as it arrives
//! (streamed chunks pass through unchanged), so local encoders and a hosted GPT share one endpoint.

use std::io::Read;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use super::api::ApiError;
use crate::remote::{RemoteModel, Upstream};

/// Forward `body` to the remote API's `path` and relay its answer.
pub async fn forward(
    remote: Arc<RemoteModel>,
    path: &'static str,
    mut body: Value,
) -> Result<Response, ApiError> {
    body["model"] = json!(remote.model());
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    let (body_tx, body_rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(32);
    // ureq blocks; the relay runs on a blocking thread and hands the bytes over as they arrive.
    tokio::task::spawn_blocking(move || {
        let response = match remote.send(path, &body) {
            Ok(Upstream::Success(response)) => response,
            Ok(Upstream::Status { code, body }) => {
                let _ = head_tx.send(Err(upstream_status(&remote, code, &body)));
                return;
            }
            Err(e) => {
                let _ = head_tx.send(Err(ApiError::internal(e.to_string())
                    .with_status(StatusCode::BAD_GATEWAY)
                    .with_code("upstream_unreachable")));
                return;
            }
        };
        let content_type = response
            .header("Content-Type")
            .unwrap_or("application/json")
            .to_string();
        if head_tx.send(Ok(content_type)).is_err() {
            return;
        }
        let mut reader = (*response).into_reader();
        let mut buffer = vec![0u8; 8192];
        loop {
            let piece = match reader.read(&mut buffer) {
                Ok(0) => return,
                Ok(n) => Ok(Bytes::copy_from_slice(&buffer[..n])),
                Err(e) => Err(e),
            };
            let failed = piece.is_err();
            // A closed channel means the client went away: stop reading from upstream.
            if body_tx.blocking_send(piece).is_err() || failed {
                return;
            }
        }
    });
    let content_type = head_rx
        .await
        .map_err(|_| ApiError::internal("the remote relay stopped"))??;
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from_stream(ReceiverStream::new(body_rx)))
        .map_err(|e| ApiError::internal(format!("building the relayed response: {e}")))
}

/// The remote API's own error, with its status, so clients see what the upstream said.
fn upstream_status(remote: &RemoteModel, code: u16, body: &str) -> ApiError {
    let message = remote.status_error(code, body).to_string();
    match StatusCode::from_u16(code) {
        // The upstream key is the server's own: a refused key is the server's failure, not the client's.
        Ok(status) if status.is_client_error() && !matches!(code, 401 | 403) => {
            ApiError::invalid(message, None).with_status(status)
        }
        Ok(status) if status.is_server_error() => ApiError::internal(message).with_status(status),
        _ => ApiError::internal(message).with_status(StatusCode::BAD_GATEWAY),
    }
}
