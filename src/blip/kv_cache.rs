//! The decoder's cache for one `generate` call (the loops' state, kept out of the model's modules): each
//! layer's self-attention keys/values, preallocated for the whole call, the image keys/values computed once
//! per image and shared by that image's rows (beams or samples), and the bookkeeping that reorders rows
//! (beam search) and drops the rows and images that finished.

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::nn::attention::sdpa;

/// Keys and values one decoder layer keeps between decoding steps.
#[derive(Debug)]
pub struct LayerCache {
    /// Self-attention keys/values, preallocated for the whole decode: `[rows, H, max_len, D]`.
    pub k: Tensor,
    pub v: Tensor,
    /// Cross-attention keys/values of the image embeddings, computed once per image.
    pub cross_kv: Option<ImageKeysValues>,
}

/// One cross-attention layer's image keys/values, kept for a whole `generate` call. For float32 on the CPU
/// they are stored features-first, `[images, H, D, N]`, the layout decoding reads fastest: a step's scores
/// and context are then two batched matrix products that stream memory in order (~1.6x faster than
/// `scaled_dot_product_attention` over the projections' strided views at batch 8), and the projections
/// write that layout directly (no transposing copy). Half precision, and CUDA, keep `[images, H, N, D]` for
/// the fused SDPA kernels, which also keep transformers' rounding (they accumulate in float32).
#[derive(Debug)]
pub enum ImageKeysValues {
    FeaturesFirst { keys: Tensor, values: Tensor },
    Heads { keys: Tensor, values: Tensor },
}

impl ImageKeysValues {
    /// Whether the keys/values of `image` are kept features-first: float32 on the CPU.
    pub fn features_first_for(image: &Tensor) -> bool {
        image.kind() == Kind::Float && image.device() == tch::Device::Cpu
    }

    fn images(&self) -> i64 {
        match self {
            Self::FeaturesFirst { values, .. } | Self::Heads { values, .. } => values.size()[0],
        }
    }

    /// The images `index` (an index into dimension 0), in that order.
    fn select(&self, index: &Tensor) -> Result<Self> {
        Ok(match self {
            Self::FeaturesFirst { keys, values } => Self::FeaturesFirst {
                keys: keys.f_index_select(0, index)?,
                values: values.f_index_select(0, index)?,
            },
            Self::Heads { keys, values } => Self::Heads {
                keys: keys.f_index_select(0, index)?,
                values: values.f_index_select(0, index)?,
            },
        })
    }

    /// Cross-attention of the query rows `q` (`[R, H, T, D]`, rows grouped by image as `layout` says) over
    /// their images' keys/values: an image's rows are stacked as extra query positions of that image, so its
    /// keys/values are never copied. Returns the context `[R, H, T, D]`.
    pub fn attend_rows(&self, q: &Tensor, layout: &CrossLayout) -> Result<Tensor> {
        let (_, h, t, d) = q.size4()?;
        let images = self.images();
        // Every image gets `group` query slots: a view when all images have as many rows, else a padded copy
        // (the padding costs only attention scores, which are cheap next to the rows' projections and MLP).
        let (q, group) = match layout {
            CrossLayout::Uniform(n) => (q.shallow_clone(), *n),
            CrossLayout::Padded { slots, group } => {
                let mut padded = Tensor::f_zeros([images * group, h, t, d], (q.kind(), q.device()))?;
                let _ = padded.f_index_copy_(0, slots, q)?;
                (padded, *group)
            }
        };
        let q = q
            .f_view([images, group, h, t, d])?
            .f_permute([0, 2, 1, 3, 4])?
            .f_reshape([images, h, group * t, d])?;
        // No attention dropout: shared keys/values serve only inference (decoding, ITM scoring).
        let ctx = self.attend(&q)?; // [images, H, group*T, D]
        let ctx = ctx
            .f_view([images, h, group, t, d])?
            .f_permute([0, 2, 1, 3, 4])?
            .f_reshape([images * group, h, t, d])?;
        let ctx = match layout {
            CrossLayout::Padded { slots, .. } => ctx.f_index_select(0, slots)?,
            CrossLayout::Uniform(_) => ctx,
        };
        Ok(ctx)
    }

    /// `softmax(q kᵀ / √D) v` for `q` of shape `[images, H, Q, D]` (no mask: every image position counts).
    fn attend(&self, q: &Tensor) -> Result<Tensor> {
        let (keys, values) = match self {
            Self::Heads { keys, values } => return sdpa(q, keys, values, None, 0.0, false),
            Self::FeaturesFirst { keys, values } => (keys, values),
        };
        let (images, h, queries, d) = q.size4()?;
        let n = keys.size()[3];
        // 1/√D is a power of two for the usual head sizes, so scaling q first changes no bits.
        let q = q
            .f_mul_scalar(1.0 / (d as f64).sqrt())?
            .f_reshape([images * h, queries, d])?;
        let scores = q.f_bmm(&keys.f_view([images * h, d, n])?)?;
        let probs = scores.f_softmax(-1, scores.kind())?;
        let values = values.f_view([images * h, d, n])?.f_transpose(1, 2)?; // BLAS reads it transposed
        Ok(probs.f_bmm(&values)?.f_view([images, h, queries, d])?)
    }
}

/// How text rows share the image keys/values in cross-attention (a decoding batch's beams, the candidate
/// texts ITM re-ranks for an image). Rows are sorted by image; an image's rows are stacked as extra query
/// positions of that image, so its keys/values are computed once and never copied.
#[derive(Debug)]
pub enum CrossLayout {
    /// Every `n` consecutive rows belong to one image (beams, or samples of an image): the stacking is a view.
    Uniform(i64),
    /// Images with different numbers of rows (some rows finished): row `r`'s query goes to slot `slots[r]` of a
    /// zero-padded `[images * group]` buffer, `group` being the largest number of rows of an image.
    Padded { slots: Tensor, group: i64 },
}

impl CrossLayout {
    /// The cross-attention layout of rows whose images are `row_image` (ascending, numbered from 0).
    pub fn of_rows(row_image: &[i64], device: tch::Device) -> Result<CrossLayout> {
        // Each row's rank among its image's rows.
        let mut ranks = Vec::with_capacity(row_image.len());
        for (r, &i) in row_image.iter().enumerate() {
            let rank = match ranks.last() {
                Some(&prev) if row_image[r - 1] == i => prev + 1,
                _ => 0,
            };
            ranks.push(rank);
        }
        let group = ranks.iter().max().map_or(1, |&m| m + 1);
        let images = row_image.last().map_or(0, |&i| i + 1);
        if ranks.len() as i64 == images * group {
            return Ok(CrossLayout::Uniform(group));
        }
        let slots: Vec<i64> = row_image
            .iter()
            .zip(&ranks)
            .map(|(&i, &rank)| i * group + rank)
            .collect();
        Ok(CrossLayout::Padded {
            slots: Tensor::f_from_slice(&slots)?.f_to_device(device)?,
            group,
        })
    }
}

/// The images of rows sorted by image (`row_image`, ascending), each once in order, and each row's image
/// renumbered 0.. in that order (what [`CrossLayout::of_rows`] reads).
pub fn number_images(row_image: &[i64]) -> (Vec<i64>, Vec<i64>) {
    let mut images: Vec<i64> = Vec::new();
    let mut renumbered = Vec::with_capacity(row_image.len());
    for &i in row_image {
        if images.last() != Some(&i) {
            images.push(i);
        }
        renumbered.push(images.len() as i64 - 1);
    }
    (images, renumbered)
}

/// The decoder's cache for one `generate` call. Rows are grouped by image (beams or samples of the same image
/// next to each other); the image keys/values are shared by the rows of an image, never copied.
#[derive(Debug)]
pub struct DecoderCache {
    pub layers: Vec<LayerCache>,
    /// Positions filled so far.
    pub len: i64,
    /// The image of each row (an index into the image keys/values), ascending.
    row_image: Vec<i64>,
    layout: CrossLayout,
}

impl DecoderCache {
    /// An empty cache for `layers` layers of self-attention keys/values shaped `[rows, H, max_len, D]`, every
    /// `per_image` consecutive rows sharing one image.
    pub fn new(layers: usize, shape: [i64; 4], per_image: i64, opts: (Kind, tch::Device)) -> Result<Self> {
        let layers = (0..layers)
            .map(|_| {
                Ok(LayerCache {
                    k: Tensor::f_zeros(shape, opts)?,
                    v: Tensor::f_zeros(shape, opts)?,
                    cross_kv: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            len: 0,
            row_image: (0..shape[0]).map(|r| r / per_image).collect(),
            layout: CrossLayout::Uniform(per_image),
        })
    }

    /// Each layer's cache, with how the rows share the images' keys/values now.
    pub fn layers_and_layout(&mut self) -> (&mut [LayerCache], &CrossLayout) {
        (&mut self.layers, &self.layout)
    }

    /// The image (an index into the image keys/values) of each row.
    pub fn row_image(&self) -> &[i64] {
        &self.row_image
    }

    /// Keeps the rows `rows` (old row indices; they may also reorder beams), new row `r` belonging to the old
    /// image `row_image[r]` (ascending). Images left without rows drop their keys/values; returns the old
    /// indices of the images kept when some were dropped.
    pub fn select_rows(&mut self, rows: &Tensor, row_image: &[i64]) -> Result<Option<Tensor>> {
        self.reorder(rows)?;
        let (images, renumbered) = number_images(row_image);
        let before = self.row_image.last().map_or(0, |&i| i + 1);
        let kept = if (images.len() as i64) < before {
            let index = Tensor::f_from_slice(&images)?.f_to_device(rows.device())?;
            for layer in &mut self.layers {
                if let Some(kv) = &layer.cross_kv {
                    layer.cross_kv = Some(kv.select(&index)?);
                }
            }
            Some(index)
        } else {
            None
        };
        self.row_image = renumbered;
        self.layout = CrossLayout::of_rows(&self.row_image, rows.device())?;
        Ok(kept)
    }

    /// Reorders the rows within their images (beam search): row `i` takes the keys/values of row `index[i]`.
    pub fn reorder(&mut self, index: &Tensor) -> Result<()> {
        for layer in &mut self.layers {
            layer.k = layer.k.f_index_select(0, index)?;
            layer.v = layer.v.f_index_select(0, index)?;
        }
        Ok(())
    }
}
