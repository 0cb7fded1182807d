//! `pirclip serve`: search over pirclip indexes by HTTP, with clip-retrieval's back-end API so its clients
//! work (`GET /indices-list`, `POST /knn-service`, `POST /metadata`), plus `GET /image/<indice>/<id>`,
//! `GET /health` and an offline web page at `/`.
//!
//! One thread owns the model and encodes queries from a bounded queue: a request that finds the queue
//! full is answered 503 at once. Text queries are cached. Bad input is a 4xx with a message.
//!
//! An index folder may come from someone else, so the server trusts nothing in it:
//! - files are served only by their id in an index (no path from a URL reaches the disk), only from
//!   under the index's image roots (recorded at build time or given with `--image-root`, canonical,
//!   symbolic links resolved at each request), and only when they read as images;
//! - a body whose declared length is over the limit is answered 413 at once, and one that does not
//!   arrive within [`BODY_TIMEOUT`] 408, so no client can hold a connection open by promising bytes;
//! - results are capped, and never allocated beyond the rows an index holds;
//! - scene renders run at most [`RENDERS`] at a time, each scene decoded once however many requests
//!   ask for it, and through the bounded scene reader (a tile reads only its part of the file); a
//!   whole-scene preview is rendered once and the last two are kept.

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use pirclip_model::clip::images_tensor;
use pirclip_model::{l2_normalize, ClipModel, EncodeOptions};
use pirclip_store::LoadedIndex;
use serde_json::{json, Value};
use tokio::sync::oneshot;

mod encoder;
mod render;
mod roots;

pub use encoder::Encoder;
use encoder::Job;
use render::{render, Kept, OpenedScene};
pub use roots::ServedIndex;

/// Limits of a running server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body (an uploaded image travels base64 in JSON).
    pub max_body_bytes: usize,
    /// Most results one query may ask for.
    pub max_results: usize,
    /// Queries waiting for the model beyond the one it is encoding; more are answered 503.
    pub queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 16 << 20,
            max_results: 1000,
            queue: 64,
        }
    }
}

pub struct AppState {
    pub indices: Vec<ServedIndex>,
    pub encoder: Encoder,
    pub model_name: String,
    pub limits: Limits,
    text_cache: Mutex<HashMap<String, Vec<f32>>>,
    scenes: Kept<OpenedScene>,
    previews: Kept<Bytes>,
    renders: tokio::sync::Semaphore,
    /// Renders running or waiting.
    render_requests: std::sync::atomic::AtomicUsize,
    raw_reads: tokio::sync::Semaphore,
}

/// Takes one off a count when dropped (a request that ends, however it ends).
struct Counted<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl AppState {
    pub fn new(
        indices: Vec<ServedIndex>,
        encoder: Encoder,
        model_name: String,
        limits: Limits,
    ) -> Self {
        AppState {
            indices,
            encoder,
            model_name,
            limits,
            text_cache: Mutex::new(HashMap::new()),
            scenes: Kept::default(),
            previews: Kept::default(),
            renders: tokio::sync::Semaphore::new(RENDERS),
            render_requests: Default::default(),
            raw_reads: tokio::sync::Semaphore::new(RAW_READS),
        }
    }

    fn index(&self, name: Option<&str>) -> Result<&ServedIndex, ApiError> {
        match name {
            None => self
                .indices
                .first()
                .ok_or_else(|| ApiError::not_found("no index is loaded")),
            Some(n) => self.indices.iter().find(|i| i.name == n).ok_or_else(|| {
                ApiError::not_found(format!(
                    "unknown indice_name {:?}; GET /indices-list names the indexes",
                    pirclip_store::clip_text(n, 100)
                ))
            }),
        }
    }
}

/// Scene renders at once (each may decode a scene: CPU and memory bound); more wait their turn, and
/// beyond [`RENDER_QUEUE`] waiting are answered 503.
pub const RENDERS: usize = 2;
const RENDER_QUEUE: usize = 64;
/// Longest a request body may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Plain image files read at once.
const RAW_READS: usize = 8;
/// Largest plain image file served as it is (bigger ones are rendered down).
const MAX_RAW_FILE_BYTES: u64 = 64 << 20;

/// An error answered as `{"error": message}` with its status.
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(m: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, m.into())
    }
    fn not_found(m: impl Into<String>) -> Self {
        ApiError(StatusCode::NOT_FOUND, m.into())
    }
    fn busy() -> Self {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the query queue is full; retry shortly".into(),
        )
    }
    fn internal(m: impl Into<String>) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, m.into())
    }
}

/// Holds every request body to the size limit and the time limit before a handler sees it: a declared
/// length over the limit is answered 413 without reading a byte, a body that grows past it 413, and
/// one that has not arrived within [`BODY_TIMEOUT`] 408.
async fn bounded_body(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u128>().ok());
    let too_large = || {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over the limit of {limit} bytes (--max-body-bytes)"),
        )
        .into_response()
    };
    if declared.is_some_and(|n| n > limit as u128) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Err(_) => {
            return ApiError(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            )
            .into_response()
        }
        Ok(Err(_)) => return too_large(),
        Ok(Ok(b)) => b,
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("request body is not the expected JSON: {e}")))
}

#[derive(serde::Deserialize)]
struct KnnRequest {
    text: Option<String>,
    image: Option<String>,
    image_url: Option<String>,
    embedding_input: Option<Vec<f32>>,
    modality: Option<String>,
    num_images: Option<usize>,
    num_result_ids: Option<usize>,
    indice_name: Option<String>,
    #[serde(default)]
    deduplicate: bool,
}

fn entry_json(id: usize, e: &pirclip_store::Entry) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("id".into(), json!(id));
    m.insert("image_path".into(), json!(e.image_path));
    m.insert("size".into(), json!(e.size));
    m.insert("mtime".into(), json!(e.mtime));
    if let Some(t) = &e.tile {
        m.insert("tile_x".into(), json!(t.x));
        m.insert("tile_y".into(), json!(t.y));
        m.insert("tile_width".into(), json!(t.width));
        m.insert("tile_height".into(), json!(t.height));
    }
    if let Some(g) = &e.geo {
        m.insert("center_x".into(), json!(g.x));
        m.insert("center_y".into(), json!(g.y));
        m.insert("crs".into(), json!(g.crs));
    }
    m
}

async fn knn(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let r: KnnRequest = parse(&body)?;
    let index = &s.index(r.indice_name.as_deref())?.index;
    if r.modality.as_deref().is_some_and(|m| m != "image") {
        return Err(ApiError::bad(
            "pirclip indexes hold image embeddings: use modality \"image\"",
        ));
    }
    let dim = index.store.dim();
    let query = if let Some(v) = r.embedding_input {
        if v.len() != dim {
            return Err(ApiError::bad(format!(
                "embedding_input has {} values, the index {dim}",
                v.len()
            )));
        }
        let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32;
        if !v.iter().all(|x| x.is_finite()) || !norm.is_finite() || norm == 0.0 {
            return Err(ApiError::bad("embedding_input must be finite and non-zero"));
        }
        v.iter().map(|x| x / norm).collect()
    } else if let Some(text) = r.text.filter(|t| !t.trim().is_empty()) {
        let cached = s.text_cache.lock().unwrap().get(&text).cloned();
        match cached {
            Some(v) => v,
            None => {
                let v = s
                    .encoder
                    .run(|reply| Job::Text(text.clone(), reply))
                    .await?;
                let mut cache = s.text_cache.lock().unwrap();
                if cache.len() >= 10_000 {
                    cache.clear();
                }
                cache.insert(text, v.clone());
                v
            }
        }
    } else if let Some(b64) = r.image {
        let b64 = b64.split_once("base64,").map(|(_, d)| d).unwrap_or(&b64);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| ApiError::bad(format!("image is not base64: {e}")))?;
        s.encoder.run(|reply| Job::Image(bytes, reply)).await?
    } else if r.image_url.is_some() {
        return Err(ApiError::bad("image_url is not fetched (pirclip serves offline): send the image as base64 in `image`"));
    } else {
        return Err(ApiError::bad(
            "give `text`, `image` (base64) or `embedding_input`",
        ));
    };
    if query.len() != dim {
        return Err(ApiError::internal(format!(
            "the model's embeddings have {} values, the index {dim}",
            query.len()
        )));
    }
    // Clamped to the rows the index holds before anything is allocated by it.
    let k = r
        .num_images
        .or(r.num_result_ids)
        .unwrap_or(40)
        .min(s.limits.max_results)
        .min(index.entries.len());
    let fetch = if r.deduplicate {
        k.saturating_mul(2).max(k.saturating_add(10))
    } else {
        k
    };
    let mut kept: Vec<(usize, f32)> = Vec::with_capacity(k);
    let mut kept_vectors: Vec<Vec<f32>> = Vec::new();
    let hits = index
        .search(&query, fetch)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    for (i, score) in hits {
        if r.deduplicate {
            let row = index.store.vector(i);
            let twin = kept_vectors.iter().any(|other: &Vec<f32>| {
                other.iter().zip(&row).map(|(a, b)| a * b).sum::<f32>() > 0.9995
            });
            if twin {
                continue;
            }
            kept_vectors.push(row);
        }
        kept.push((i, score));
        if kept.len() == k {
            break;
        }
    }
    Ok(Json(Value::Array(
        kept.into_iter()
            .map(|(i, score)| {
                let mut m = entry_json(i, &index.entries[i]);
                m.insert("similarity".into(), json!(score));
                Value::Object(m)
            })
            .collect(),
    )))
}

#[derive(serde::Deserialize)]
struct MetadataRequest {
    indice_name: Option<String>,
    ids: Vec<usize>,
}

async fn metadata(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let r: MetadataRequest = parse(&body)?;
    let index = &s.index(r.indice_name.as_deref())?.index;
    if r.ids.len() > s.limits.max_results {
        return Err(ApiError::bad(format!(
            "at most {} ids per request",
            s.limits.max_results
        )));
    }
    Ok(Json(Value::Array(
        r.ids
            .iter()
            .filter_map(|&id| {
                index
                    .entries
                    .get(id)
                    .map(|e| json!({ "id": id, "metadata": Value::Object(entry_json(id, e)) }))
            })
            .collect(),
    )))
}

#[derive(serde::Deserialize)]
struct ImageQuery {
    format: Option<String>,
}

async fn image(
    State(s): State<Arc<AppState>>,
    Path((indice, id)): Path<(String, usize)>,
    axum::extract::Query(query): axum::extract::Query<ImageQuery>,
) -> Result<Response, ApiError> {
    let served = s.index(Some(&indice))?;
    let index = &served.index;
    let entry = index
        .entries
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("{} has no image {id}", served.name)))?;
    let path = served.file_of(entry)?;
    let is_tiff = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("tif") || e.eq_ignore_ascii_case("tiff"));
    let geotiff = match query.format.as_deref() {
        None | Some("png") => false,
        Some("geotiff" | "tif" | "tiff") => true,
        Some(other) => {
            return Err(ApiError::bad(format!(
                "format {:?}: use png (default) or geotiff",
                pirclip_store::clip_text(other, 40)
            )))
        }
    };
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    if entry.tile.is_some() || is_tiff || geotiff || size > MAX_RAW_FILE_BYTES {
        let (tile, bands) = (entry.tile, index.dir.identity.scene.bands);
        let waiting = s
            .render_requests
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _counted = Counted(&s.render_requests);
        if waiting >= RENDERS + RENDER_QUEUE {
            return Err(ApiError::busy());
        }
        let bytes = render(&s, path, tile, bands, geotiff)
            .await
            .map_err(|e| ApiError::not_found(format!("image {id}: {e}")))?;
        let kind = if geotiff { "image/tiff" } else { "image/png" };
        return Ok((
            [
                (header::CONTENT_TYPE, kind),
                (header::CACHE_CONTROL, "max-age=3600"),
            ],
            bytes,
        )
            .into_response());
    }
    // Files are read whole: at most RAW_READS at once, so memory stays under RAW_READS × 64 MB.
    let _permit = s
        .raw_reads
        .acquire()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| ApiError::not_found(format!("image {id}: {e}")))?;
    // Only images leave the server: a file under an image root that is something else (a text file
    // named .jpg) is refused.
    let kind = match pirclip_image::probe(&bytes) {
        Some(kind) => kind,
        None => {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("image {id}: the file is not an image"),
            ))
        }
    };
    Ok((
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        bytes,
    )
        .into_response())
}

async fn indices_list(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!(s.indices.iter().map(|i| &i.name).collect::<Vec<_>>()))
}

async fn health(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": s.model_name,
        "indices": s.indices.iter().map(|ServedIndex { name: n, index: i, .. }| json!({
            "name": n,
            "images": i.entries.len(),
            // What a row is: a whole image, or a tile cut from a scene (the index's `--tile`).
            "unit": if i.dir.identity.scene.tile.is_some() { "tiles" } else { "images" },
            "search": i.search_kind,
        })).collect::<Vec<_>>(),
    }))
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.limits.max_body_bytes;
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/indices-list", get(indices_list))
        .route("/knn-service", post(knn))
        .route("/metadata", post(metadata))
        .route("/image/{indice}/{id}", get(image))
        .layer(axum::middleware::from_fn_with_state(
            body_limit,
            bounded_body,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Serves until the process ends.
pub fn serve(addr: std::net::SocketAddr, state: AppState) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        axum::serve(listener, router(Arc::new(state))).await
    })
}
