//! The served model: its manifest, and its files by HTTP Range so that each node downloads
//! only its own layers. Bytes served are counted per node (by the `x-mdi-node` header), so
//! tests and `/api/ring` report what each node really fetched.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use mdi_core::manifest::{Manifest, ManifestFile};
use mdi_core::plan::ModelCost;
use mdi_core::weights::Naming;
use mdi_core::{Config, Tokenizer};
use mdi_runtime::session::NODE_HEADER;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::api::ApiError;
use crate::room::ModelFacts;
use crate::AppState;

/// One served file.
pub struct ServedFile {
    pub path: PathBuf,
    pub len: u64,
    pub sha256: String,
}

/// The model as the server holds it.
pub struct ServedModel {
    /// The id `/v1/models` lists.
    pub id: String,
    pub config: Config,
    pub tokenizer: Tokenizer,
    pub files: Vec<ServedFile>,
    /// The manifest, serialised once.
    pub manifest_json: String,
    pub facts: ModelFacts,
    /// Bytes served from the model files, by the node that asked (0: no or bad header).
    pub served: Mutex<HashMap<u64, u64>>,
}

impl ServedModel {
    /// Opens a GGUF file or a Hugging Face folder and describes it.
    pub fn open(path: &Path) -> Result<Self> {
        let model = mdi::open_model(path)?;
        let id = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("model")
            .to_string();
        let (naming, paths): (Naming, Vec<PathBuf>) = if path.is_dir() {
            let mut shards: Vec<PathBuf> = std::fs::read_dir(path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            shards.sort();
            (Naming::HuggingFace, shards)
        } else {
            (Naming::Gguf, vec![path.to_path_buf()])
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut listed = Vec::with_capacity(paths.len());
        for (i, p) in paths.into_iter().enumerate() {
            let len = std::fs::metadata(&p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .len();
            let sha256 = mdi::fetch::sha256_file(&p)?;
            listed.push(ManifestFile {
                url: format!("/model/file/{i}"),
                len,
                sha256: sha256.clone(),
            });
            files.push(ServedFile {
                path: p,
                len,
                sha256,
            });
        }
        let manifest = Manifest::build(
            id.clone(),
            &model.config,
            naming,
            model.store.as_ref(),
            listed,
            Some(model.tokenizer.to_json()?),
            model.tokenizer.chat_template().map(str::to_string),
        )?;
        let cost = ModelCost::from_store(model.store.as_ref(), &model.config)?;
        Ok(Self {
            facts: ModelFacts {
                id: id.clone(),
                cost,
                context: model.config.context,
            },
            id,
            config: model.config,
            tokenizer: model.tokenizer,
            files,
            manifest_json: serde_json::to_string(&manifest)?,
            served: Mutex::new(HashMap::new()),
        })
    }

    /// Bytes of model files served to node `id`.
    pub fn served_to(&self, id: u64) -> u64 {
        let s = self.served.lock().unwrap_or_else(|p| p.into_inner());
        s.get(&id).copied().unwrap_or(0)
    }
}

/// `GET /model/manifest`
pub async fn manifest(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = app.check_token(&headers) {
        return e.into_response();
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        app.model.manifest_json.clone(),
    )
        .into_response()
}

/// A parsed `Range` header: one range, inclusive end, resolved against the file length.
fn parse_range(value: &str, len: u64) -> std::result::Result<(u64, u64), String> {
    let spec = value
        .trim()
        .strip_prefix("bytes=")
        .ok_or_else(|| format!("only byte ranges are served, not `{value}`"))?;
    if spec.contains(',') {
        return Err("only one range per request is served".into());
    }
    let (a, b) = spec
        .split_once('-')
        .ok_or_else(|| format!("malformed range `{value}`"))?;
    let num = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("malformed range `{value}`"))
    };
    let (start, end) = match (a.trim().is_empty(), b.trim().is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => {
            let n = num(b)?.min(len);
            (len - n, len.saturating_sub(1))
        }
        (false, true) => (num(a)?, len.saturating_sub(1)),
        (false, false) => (num(a)?, num(b)?.min(len.saturating_sub(1))),
        (true, true) => return Err(format!("malformed range `{value}`")),
    };
    if len == 0 || start >= len || start > end {
        return Err(format!(
            "range {start}-{end} is outside the file's {len} bytes"
        ));
    }
    Ok((start, end))
}

/// `GET /model/file/{i}`, with `Range` support (206, 416), a strong `ETag` (the sha256),
/// `Accept-Ranges` and `If-None-Match`.
pub async fn file(
    State(app): State<Arc<AppState>>,
    UrlPath(index): UrlPath<usize>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = app.check_token(&headers) {
        return e.into_response();
    }
    let Some(f) = app.model.files.get(index) else {
        return ApiError::not_found(format!("the model has no file {index}")).into_response();
    };
    let etag = format!("\"{}\"", f.sha256);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    let range = match headers.get(header::RANGE).map(|v| v.to_str()) {
        None => None,
        Some(Err(_)) => {
            return ApiError::bad_request("the Range header is not text").into_response()
        }
        Some(Ok(v)) => match parse_range(v, f.len) {
            Ok(r) => Some(r),
            Err(e) => {
                let mut resp = ApiError {
                    status: StatusCode::RANGE_NOT_SATISFIABLE,
                    message: e,
                    kind: "invalid_request_error",
                    code: Some("range_not_satisfiable"),
                }
                .into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", f.len)) {
                    resp.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return resp;
            }
        },
    };
    let (start, end) = range.unwrap_or((0, f.len.saturating_sub(1)));
    let n = if f.len == 0 { 0 } else { end - start + 1 };
    let node: u64 = headers
        .get(NODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut file = match tokio::fs::File::open(&f.path).await {
        Ok(x) => x,
        Err(e) => {
            return ApiError::internal(format!("cannot open the model file: {e}")).into_response()
        }
    };
    if let Err(e) = file.seek(SeekFrom::Start(start)).await {
        return ApiError::internal(format!("cannot read the model file: {e}")).into_response();
    }
    {
        let mut served = app.model.served.lock().unwrap_or_else(|p| p.into_inner());
        *served.entry(node).or_insert(0) += n;
    }
    // Large reads: the default 4 KiB chunks cost more CPU than the copy itself.
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file.take(n),
        256 << 10,
    ));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&n.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if range.is_some() {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{}", f.len)) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Ok((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Ok((90, 99)));
        assert_eq!(parse_range("bytes=95-200", 100), Ok((95, 99)));
        for bad in [
            "bytes=100-",
            "bytes=5-2",
            "bytes=0-1,4-5",
            "items=0-1",
            "bytes=x-3",
            "bytes=-",
        ] {
            assert!(parse_range(bad, 100).is_err(), "{bad}");
        }
    }
}
