//! `pirclip serve`: search over pirclip indexes by HTTP, with clip-retrieval's back-end API so its clients
//! work (`GET /indices-list`, `POST /knn-service`, `POST /metadata`), plus `GET /image/<indice>/<id>`,
//! `GET /health` and an offline web page at `/`.
//!
//! One thread owns the model and encodes queries from a bounded queue: a request that finds the queue
//! full is answered 503 at once. Text queries are cached. Files are served only by their id in an index
//! (no path from a URL reaches the disk); bodies are capped, results are capped, and bad input is a 4xx
//! with a message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use pirclip_model::clip::images_tensor;
use pirclip_model::{l2_normalize, ClipModel, EncodeOptions};
use pirclip_store::LoadedIndex;
use serde_json::{json, Value};
use tokio::sync::oneshot;

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

enum Job {
    Text(String, oneshot::Sender<Result<Vec<f32>, String>>),
    Image(Vec<u8>, oneshot::Sender<Result<Vec<f32>, String>>),
}

/// The model on its own thread, fed through a bounded queue.
pub struct Encoder {
    tx: std::sync::mpsc::SyncSender<Job>,
}

impl Encoder {
    /// Starts the model thread; `load` builds the model there (libtorch modules stay on one thread).
    /// Returns once the model is loaded, or with the load error.
    pub fn spawn(
        load: impl FnOnce() -> Result<ClipModel, String> + Send + 'static,
        opts: EncodeOptions,
        queue: usize,
    ) -> Result<Self, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(queue);
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let model = match load() {
                Ok(m) => {
                    let _ = ready_tx.send(Ok(()));
                    m
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let size = model.config.image_size;
            for job in rx {
                match job {
                    Job::Text(text, reply) => {
                        let e = pirclip_retrieval::encode_texts(
                            &model,
                            &[text],
                            1,
                            true,
                            &pirclip_retrieval::Quiet,
                        );
                        let _ = reply.send(Ok(e.values));
                    }
                    Job::Image(bytes, reply) => {
                        let r = pirclip_image::decode(&bytes, "uploaded image")
                            .map_err(|e| e.to_string())
                            .map(|img| {
                                let px = pirclip_image::preprocess_eval(&img, size);
                                let x = images_tensor(&px, 1, size, model.device());
                                pirclip_retrieval::to_vec(&tch::no_grad(|| {
                                    l2_normalize(&model.encode_image(&x, opts))
                                }))
                            });
                        let _ = reply.send(r);
                    }
                }
            }
        });
        ready
            .recv()
            .map_err(|_| "the model thread stopped while loading".to_string())??;
        Ok(Encoder { tx })
    }

    async fn run(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<Vec<f32>, String>>) -> Job,
    ) -> Result<Vec<f32>, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.tx.try_send(job(reply)).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => ApiError::busy(),
            std::sync::mpsc::TrySendError::Disconnected(_) => {
                ApiError::internal("the model thread stopped")
            }
        })?;
        answer
            .await
            .map_err(|_| ApiError::internal("the model thread stopped"))?
            .map_err(|e| ApiError::bad(format!("image: {e}")))
    }
}

pub struct AppState {
    pub indices: Vec<(String, LoadedIndex)>,
    pub encoder: Encoder,
    pub model_name: String,
    pub limits: Limits,
    text_cache: Mutex<HashMap<String, Vec<f32>>>,
    /// The scene decoded last: a page of results is often many tiles of one scene.
    last_scene: Mutex<Option<(String, Arc<pirclip_image::Scene>)>>,
}

impl AppState {
    pub fn new(
        indices: Vec<(String, LoadedIndex)>,
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
            last_scene: Mutex::new(None),
        }
    }

    fn index(&self, name: Option<&str>) -> Result<&LoadedIndex, ApiError> {
        match name {
            None => self
                .indices
                .first()
                .map(|(_, i)| i)
                .ok_or_else(|| ApiError::not_found("no index is loaded")),
            Some(n) => self
                .indices
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, i)| i)
                .ok_or_else(|| {
                    ApiError::not_found(format!(
                        "unknown indice_name {n:?}; GET /indices-list names the indexes"
                    ))
                }),
        }
    }
}

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

/// Longest side of a rendered scene or tile sent to a browser.
const MAX_RENDERED_SIDE: usize = 1024;

/// A tile cut from its scene, or a TIFF rendered with the index's bands: PNG, or with `geotiff` an 8-bit
/// GeoTIFF carrying the tile's own georeferencing (full resolution, for a GIS).
fn render(
    s: &AppState,
    path: &std::path::Path,
    tile: Option<pirclip_store::Tile>,
    bands: Option<[usize; 3]>,
    geotiff: bool,
) -> Result<Vec<u8>, String> {
    let key = path.display().to_string();
    let cached = s
        .last_scene
        .lock()
        .unwrap()
        .as_ref()
        .filter(|(k, _)| *k == key)
        .map(|(_, scene)| scene.clone());
    let scene = match cached {
        Some(scene) => scene,
        None => {
            let decoded =
                pirclip_image::decode_scene_file(path, &pirclip_image::SceneOptions { bands })
                    .map_err(|e| e.to_string())?;
            let scene = Arc::new(decoded);
            *s.last_scene.lock().unwrap() = Some((key, scene.clone()));
            scene
        }
    };
    let img = &scene.image;
    let window = match tile {
        Some(t) => {
            let fits = t.x >= 0
                && t.y >= 0
                && t.width > 0
                && t.height > 0
                && (t.x + t.width) as usize <= img.width
                && (t.y + t.height) as usize <= img.height;
            if !fits {
                return Err(format!(
                    "tile {},{} {}×{} is outside the {}×{} scene (has the file changed?)",
                    t.x, t.y, t.width, t.height, img.width, img.height
                ));
            }
            pirclip_image::Window {
                x: t.x as usize,
                y: t.y as usize,
                width: t.width as usize,
                height: t.height as usize,
            }
        }
        None => pirclip_image::Window {
            x: 0,
            y: 0,
            width: img.width,
            height: img.height,
        },
    };
    let mut out = pirclip_image::scene::crop(img, window);
    if geotiff {
        let geo = scene.geo.as_ref().map(|g| {
            let (x, y) = g.transform.apply(window.x as f64, window.y as f64);
            let mut t = g.transform;
            t.0[0] = x;
            t.0[3] = y;
            pirclip_image::GeoRef {
                transform: t,
                crs: g.crs.clone(),
            }
        });
        return pirclip_image::scene::encode_geotiff(&out, geo.as_ref());
    }
    let long = out.width.max(out.height);
    if long > MAX_RENDERED_SIDE {
        let scale = MAX_RENDERED_SIDE as f64 / long as f64;
        let (w, h) = (
            ((out.width as f64 * scale).round() as usize).max(1),
            ((out.height as f64 * scale).round() as usize).max(1),
        );
        out = pirclip_image::resize_bicubic(&out, w, h);
    }
    Ok(pirclip_image::encode_png(&out))
}

async fn knn(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let r: KnnRequest = parse(&body)?;
    let index = s.index(r.indice_name.as_deref())?;
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
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if !norm.is_finite() || norm == 0.0 {
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
    let k = r
        .num_images
        .or(r.num_result_ids)
        .unwrap_or(40)
        .min(s.limits.max_results);
    let fetch = if r.deduplicate {
        (k * 2).max(k + 10)
    } else {
        k
    };
    let mut kept: Vec<(usize, f32)> = Vec::with_capacity(k);
    let mut kept_vectors: Vec<Vec<f32>> = Vec::new();
    for (i, score) in index.store.search(&query, fetch) {
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
    let index = s.index(r.indice_name.as_deref())?;
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
    let index = s.index(Some(&indice))?;
    let entry = index
        .entries
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("{indice} has no image {id}")))?;
    let path = std::path::PathBuf::from(&entry.image_path);
    let is_tiff = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("tif") || e.eq_ignore_ascii_case("tiff"));
    let geotiff = match query.format.as_deref() {
        None | Some("png") => false,
        Some("geotiff" | "tif" | "tiff") => true,
        Some(other) => {
            return Err(ApiError::bad(format!(
                "format {other:?}: use png (default) or geotiff"
            )))
        }
    };
    if entry.tile.is_some() || is_tiff || geotiff {
        let (tile, bands) = (entry.tile, index.dir.identity.scene.bands);
        let state = s.clone();
        let bytes =
            tokio::task::spawn_blocking(move || render(&state, &path, tile, bands, geotiff))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
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
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| ApiError::not_found(format!("image {id}: {e}")))?;
    let kind = match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("bmp") => "image/bmp",
        _ => "application/octet-stream",
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
    Json(json!(s.indices.iter().map(|(n, _)| n).collect::<Vec<_>>()))
}

async fn health(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": s.model_name,
        "indices": s.indices.iter().map(|(n, i)| json!({
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
