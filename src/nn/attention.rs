//! Attention through `scaled_dot_product_attention`, and the additive masks transformers builds.

use tch::{Kind, Tensor};

use crate::error::Result;

/// The most negative finite value of `kind`: transformers' `torch.finfo(dtype).min`, used for masked positions.
pub fn finfo_min(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Double => f64::MIN,
        _ => f64::from(f32::MIN),
    }
}

/// Splits `[B, L, H*D]` into heads: `[B, H, L, D]`.
pub fn split_heads(x: &Tensor, heads: i64) -> Result<Tensor> {
    let (b, l, hd) = x.size3()?;
    Ok(x.f_view([b, l, heads, hd / heads])?.f_transpose(1, 2)?)
}

/// Joins heads back: `[B, H, L, D]` to `[B, L, H*D]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.size4()?;
    Ok(x.f_transpose(1, 2)?.f_reshape([b, l, h * d])?)
}

/// `softmax(q kᵀ / √d + mask) v` with attention-probability dropout `p` (training only).
pub fn sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    dropout: f64,
    causal: bool,
) -> Result<Tensor> {
    Ok(Tensor::f_scaled_dot_product_attention(
        q, k, v, mask, dropout, causal, None, false,
    )?)
}

/// The additive mask of a causal decoder over `[past + T]` keys for `T` queries, combined with a
/// `[B, past + T]` padding mask (1 = attend): 0 where attention is allowed and `finfo.min` elsewhere,
/// shape `[B, 1, T, past + T]`, exactly as transformers' eager attention builds it.
pub fn causal_padding_mask(attention_mask: &Tensor, queries: i64, kind: Kind) -> Result<Tensor> {
    let (_, keys) = attention_mask.size2()?;
    let past = keys - queries;
    let device = attention_mask.device();
    let q_pos = Tensor::f_arange_start(past, keys, (Kind::Int64, device))?.f_unsqueeze(1)?;
    let k_pos = Tensor::f_arange(keys, (Kind::Int64, device))?.f_unsqueeze(0)?;
    let causal = k_pos.f_le_tensor(&q_pos)?; // [T, S]
    let padding = attention_mask.f_ne(0)?.f_unsqueeze(1)?.f_unsqueeze(1)?; // [B, 1, 1, S]
    let allowed = padding.f_logical_and(&causal.f_unsqueeze(0)?.f_unsqueeze(0)?)?;
    let zero = Tensor::f_zeros([], (kind, device))?;
    let min = Tensor::f_full([], finfo_min(kind), (kind, device))?;
    Ok(zero.f_where_self(&allowed, &min)?)
}

/// The additive mask of bidirectional attention over keys a `[B, S]` padding mask keeps (1 = attend):
/// 0 where attention is allowed and `finfo.min` elsewhere, shape `[B, 1, 1, S]` (broadcast over the
/// queries), as transformers' `create_bidirectional_mask` builds it for eager attention.
pub fn padding_mask(attention_mask: &Tensor, kind: Kind) -> Result<Tensor> {
    let device = attention_mask.device();
    let allowed = attention_mask.f_ne(0)?.f_unsqueeze(1)?.f_unsqueeze(1)?;
    let zero = Tensor::f_zeros([], (kind, device))?;
    let min = Tensor::f_full([], finfo_min(kind), (kind, device))?;
    Ok(zero.f_where_self(&allowed, &min)?)
}
