//! The search interface every store implements, and exact search over all rows.

/// Nearest-neighbour search over unit vectors by inner product. The index's one interface, so that an
/// approximate index or a remote vector database can stand behind it.
pub trait VectorStore {
    fn dim(&self) -> usize;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `k` best rows for `query` (unit length), best first: (row, inner product). At most
    /// `min(k, len)` results are allocated whatever `k` is; rows whose score is not a number are never
    /// returned. An engine's failure is an error, never an empty result.
    fn search(&self, query: &[f32], k: usize) -> Result<Vec<(usize, f32)>, SearchError>;
    /// Row `row`'s vector (as stored: float16-rounded in an index).
    fn vector(&self, row: usize) -> Vec<f32>;
}

/// Why a search could not be answered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SearchError {
    #[error("the query has {got} values, the index {want}")]
    Dimension { got: usize, want: usize },
    /// The approximate index failed or answered with rows it does not hold: its file is not what it
    /// claims to be.
    #[error("the approximate index failed: {0}")]
    Engine(String),
}

pub(crate) fn check_query(query: &[f32], dim: usize) -> Result<(), SearchError> {
    if query.len() != dim {
        return Err(SearchError::Dimension {
            got: query.len(),
            want: dim,
        });
    }
    Ok(())
}

/// Inner product by numkong's SIMD kernel for this CPU (accumulated in f64).
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    use numkong::Dot;
    f32::dot(a, b).map_or(f32::NAN, |d| d as f32)
}

/// Exact search: every row scored, top-k kept. Right for archives up to a few hundred thousand images.
pub struct FlatStore {
    dim: usize,
    vectors: Vec<f32>,
}

impl FlatStore {
    /// `vectors` is `[n, dim]`; a trailing partial row is an error.
    pub fn new(dim: usize, vectors: Vec<f32>) -> Result<Self, String> {
        if dim == 0 || vectors.len() % dim != 0 {
            return Err(format!("{} values are not rows of {dim}", vectors.len()));
        }
        Ok(FlatStore { dim, vectors })
    }

    /// Row `i`'s vector.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }

    /// Rows holding a value that is not a finite number (search never returns them).
    pub fn non_finite_rows(&self) -> usize {
        self.vectors
            .chunks_exact(self.dim)
            .filter(|r| !r.iter().all(|v| v.is_finite()))
            .count()
    }
}

impl VectorStore for FlatStore {
    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.vectors.len() / self.dim
    }

    fn search(&self, query: &[f32], k: usize) -> Result<Vec<(usize, f32)>, SearchError> {
        check_query(query, self.dim)?;
        let mut scored: Vec<(usize, f32)> = self
            .vectors
            .chunks_exact(self.dim)
            .map(|row| dot_f32(row, query))
            .enumerate()
            .filter(|(_, s)| s.is_finite())
            .collect();
        let k = k.min(scored.len());
        if k == 0 {
            return Ok(Vec::new());
        }
        scored.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored.truncate(k);
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(scored)
    }

    fn vector(&self, row: usize) -> Vec<f32> {
        if row >= self.len() {
            return vec![0f32; self.dim];
        }
        self.row(row).to_vec()
    }
}
