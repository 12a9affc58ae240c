//! Training data: the batch and the batch sources the trainer draws from (encoded tensors, or images and
//! captions decoded per batch), and collation that avoids the HF recipe's traps (captions start with the BOS
//! generation uses, padding is excluded from the loss, captions truncate).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::processor::augment::{names_a_side, AugmentConfig};
use crate::processor::{preprocess_augmented, preprocess_selected, ImageProcessorConfig, ImageSource};

/// One collated batch, on the host or the model's device.
pub struct Batch {
    pub pixel_values: Tensor,
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    /// `input_ids` with padding (and anything else not to be learned) set to -100. VQA: the answers' ids
    /// with padding set to -100 (`input_ids` and `attention_mask` are the questions').
    pub labels: Tensor,
    /// VQA: the answers fed to the decoder (BOS first) and their padding mask.
    pub decoder_input_ids: Option<Tensor>,
    pub decoder_attention_mask: Option<Tensor>,
    /// Retrieval: the image each pair shows (pairs of one image are positives for each other).
    pub image_ids: Option<Tensor>,
}

impl Batch {
    /// A captioning batch: pixels and the collated captions.
    pub fn captions(pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Self {
        Self {
            pixel_values,
            input_ids,
            attention_mask,
            labels,
            decoder_input_ids: None,
            decoder_attention_mask: None,
            image_ids: None,
        }
    }
}

/// What the texts of an [`ImageCaptionSource`] are, by the head being trained.
#[derive(Debug, Clone, Default)]
pub enum Texts {
    /// Captions (`BlipForConditionalGeneration`): BOS first, pads -100, a prompt's tokens -100.
    #[default]
    Captions,
    /// Visual question answering: the source's captions are the answers (collated as captions are: BOS
    /// first, pads -100 in the labels); these are the tokenised questions, one per example, padded as the
    /// tokenizer's output is (its `[CLS]` first, as transformers feeds them).
    Questions(Vec<Vec<i64>>),
    /// Image-text retrieval: the source's captions are the texts (padded, kept as tokenised: `[CLS]`
    /// first); these are the examples' image ids.
    ImageIds(Vec<i64>),
}

/// Pads tokenised texts as they are (no BOS), cut to `max_length` keeping the last token: `(ids, mask)`.
pub fn pad_texts(texts: &[Vec<i64>], pad: i64, max_length: Option<usize>) -> Result<(Tensor, Tensor)> {
    if texts.is_empty() {
        return Err(Error::invalid("cannot collate an empty batch"));
    }
    let cut = |t: &Vec<i64>| -> Vec<i64> {
        let mut t = t.clone();
        if let Some(max) = max_length {
            if t.len() > max {
                let last = *t.last().unwrap_or(&pad);
                t.truncate(max);
                if let Some(end) = t.last_mut() {
                    *end = last;
                }
            }
        }
        if t.is_empty() {
            t.push(pad);
        }
        t
    };
    let rows: Vec<Vec<i64>> = texts.iter().map(cut).collect();
    let width = rows.iter().map(Vec::len).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut mask = Vec::with_capacity(rows.len() * width);
    for r in &rows {
        for i in 0..width {
            ids.push(r.get(i).copied().unwrap_or(pad));
            mask.push(i64::from(i < r.len()));
        }
    }
    let shape = [rows.len() as i64, width as i64];
    Ok((
        Tensor::f_from_slice(&ids)?.f_view(shape)?,
        Tensor::f_from_slice(&mask)?.f_view(shape)?,
    ))
}

/// Something that can produce the batch of given sample indices (decoding and preprocessing as needed).
/// The training source moves to a background thread that prepares batches ahead of the model.
pub trait BatchSource: Send {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn batch(&self, indices: &[usize]) -> Result<Batch>;
    /// The batch as training sees it in `epoch` of a run seeded `seed`: with training-time augmentation
    /// where the source has it (drawn per example from (seed, epoch, index)), else [`BatchSource::batch`].
    fn train_batch(&self, indices: &[usize], _epoch: i64, _seed: i64) -> Result<Batch> {
        self.batch(indices)
    }
    /// Why the trainer's feature cache may not hold image embeddings of this source's examples: None when
    /// every training batch's row `i` is example `indices[i]` with the same pixels in every epoch (no
    /// augmentation, no rows dropped). Sources that do not say are never cached.
    fn feature_cache_refusal(&self) -> Option<String> {
        Some("the training data source does not key its batches' rows by example".into())
    }
    /// The training batch of `indices` with the pixels of only the rows `with_pixels` marks (in order;
    /// `pixel_values` may have no rows): the trainer holds the other rows' image embeddings. Called only
    /// when [`Self::feature_cache_refusal`] is None. By default the whole batch is built and its pixels
    /// selected.
    fn train_batch_with_pixels_of(&self, indices: &[usize], with_pixels: &[bool]) -> Result<Batch> {
        let mut batch = self.batch(indices)?;
        batch.pixel_values = batch.pixel_values.f_index_select(0, &marked_rows(with_pixels)?)?;
        Ok(batch)
    }
}

/// The positions `marks` sets, as an index tensor.
fn marked_rows(marks: &[bool]) -> Result<Tensor> {
    let rows: Vec<i64> = (0..marks.len() as i64).filter(|&i| marks[i as usize]).collect();
    Ok(Tensor::f_from_slice(&rows)?)
}

/// The caption length limit as the caller gave it (an int, or None for no limit), checked: a caption keeps
/// BOS and its final `[SEP]`, so fewer than 2 tokens cannot be honoured (it is refused, not ignored).
pub fn check_max_length(max_length: Option<i64>) -> Result<Option<usize>> {
    match max_length {
        None => Ok(None),
        Some(m) if m >= 2 => Ok(Some(m as usize)),
        Some(m) => Err(Error::invalid(format!(
            "max_length must be at least 2 (a caption keeps its BOS and final [SEP] tokens), got {m}; use None \
             for no truncation"
        ))),
    }
}

/// Collates tokenised captions (`[CLS] ... [SEP]` from the tokenizer) into a padded batch: the first token
/// becomes `bos` (BLIP's `[DEC]`, what `generate` starts from), captions longer than `max_length` are cut
/// (keeping the final `[SEP]`), and labels are the ids with padding set to -100.
pub fn collate_captions(
    captions: &[Vec<i64>],
    bos: i64,
    pad: i64,
    max_length: Option<usize>,
) -> Result<(Tensor, Tensor, Tensor)> {
    collate_prompted_captions(captions, bos, pad, max_length, 0)
}

/// [`collate_captions`] for captions that start with a prompt of `prompt_tokens` tokens (after the first
/// token): the prompt's labels are -100 too, so the loss learns only what follows it (LAVIS's
/// `decoder_targets[:, :prompt_length] = -100`, its prompt length counting the BOS; the BOS label stays as
/// [`collate_captions`] writes it, the loss never reads it).
pub fn collate_prompted_captions(
    captions: &[Vec<i64>],
    bos: i64,
    pad: i64,
    max_length: Option<usize>,
    prompt_tokens: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    if captions.is_empty() {
        return Err(Error::invalid("cannot collate an empty batch"));
    }
    if let Some(m) = max_length {
        check_max_length(Some(m as i64))?;
    }
    let rows: Vec<Vec<i64>> = captions
        .iter()
        .map(|c| {
            let mut c = c.clone();
            if let Some(max) = max_length {
                if c.len() > max {
                    let last = *c.last().unwrap_or(&pad);
                    c.truncate(max);
                    if let Some(end) = c.last_mut() {
                        *end = last;
                    }
                }
            }
            if c.is_empty() {
                c.push(bos);
            } else {
                c[0] = bos;
            }
            c
        })
        .collect();
    let width = rows.iter().map(Vec::len).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut mask = Vec::with_capacity(rows.len() * width);
    let mut labels = Vec::with_capacity(rows.len() * width);
    for r in &rows {
        for i in 0..width {
            let real = i < r.len();
            ids.push(if real { r[i] } else { pad });
            mask.push(i64::from(real));
            labels.push(if real && !(1..=prompt_tokens).contains(&i) {
                r[i]
            } else {
                -100
            });
        }
    }
    let shape = [rows.len() as i64, width as i64];
    Ok((
        Tensor::f_from_slice(&ids)?.f_view(shape)?,
        Tensor::f_from_slice(&mask)?.f_view(shape)?,
        Tensor::f_from_slice(&labels)?.f_view(shape)?,
    ))
}

/// A dataset already encoded as tensors (rows of pixel values, ids, mask and labels), kept on the host, with
/// the training collation applied as [`collate_captions`] applies it: every row starts with `bos`, and
/// labels not given are the ids with padding set to -100.
pub struct TensorDataset {
    pub pixel_values: Tensor,
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub labels: Tensor,
}

impl TensorDataset {
    pub fn new(
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Option<Tensor>,
        labels: Option<Tensor>,
        bos: i64,
    ) -> Result<Self> {
        let n = pixel_values.size().first().copied().unwrap_or(0);
        if input_ids.dim() != 2 || input_ids.size()[0] != n {
            return Err(Error::invalid(format!(
                "input_ids must have shape [{n}, length] to match pixel_values, got {:?}",
                input_ids.size()
            )));
        }
        let input_ids = input_ids
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Int64)?
            .f_detach_copy()?; // the caller's tensor stays as it was
        if input_ids.size()[1] > 0 {
            let _ = input_ids.f_select(1, 0)?.f_fill_(bos)?;
        }
        let attention_mask = match attention_mask {
            Some(m) => m.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?,
            None => input_ids.f_ones_like()?,
        };
        if attention_mask.size() != input_ids.size() {
            return Err(Error::invalid("attention_mask must have the shape of input_ids"));
        }
        let labels = match labels {
            Some(l) => l.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?,
            None => input_ids.f_masked_fill(&attention_mask.f_eq(0)?, -100)?,
        };
        if labels.size() != input_ids.size() {
            return Err(Error::invalid("labels must have the shape of input_ids"));
        }
        Ok(Self {
            pixel_values: pixel_values.f_to_device(Device::Cpu)?,
            input_ids,
            attention_mask,
            labels,
        })
    }
}

impl BatchSource for TensorDataset {
    fn len(&self) -> usize {
        self.input_ids.size()[0] as usize
    }

    fn feature_cache_refusal(&self) -> Option<String> {
        None
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let idx: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        let idx = Tensor::f_from_slice(&idx)?;
        let mask = self.attention_mask.f_index_select(0, &idx)?;
        // Trim the columns every row pads: the loss and the real positions' logits do not change.
        let width = i64::try_from(
            mask.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Int64)?
                .f_max()?,
        )?
        .max(1);
        let trim = |t: &Tensor| -> Result<Tensor> { Ok(t.f_index_select(0, &idx)?.f_narrow(1, 0, width)?) };
        Ok(Batch::captions(
            self.pixel_values.f_index_select(0, &idx)?,
            trim(&self.input_ids)?,
            mask.f_narrow(1, 0, width)?,
            trim(&self.labels)?,
        ))
    }
}

/// Images and tokenised captions, decoded and preprocessed batch by batch on rayon threads (from the
/// trainer's prefetch thread, ahead of the model). Files stay on disk until their batch is built.
pub struct ImageCaptionSource {
    pub config: ImageProcessorConfig,
    pub images: Vec<ImageSource>,
    pub captions: Vec<Vec<i64>>,
    pub bos: i64,
    pub pad: i64,
    pub max_length: Option<usize>,
    /// Tokens of a prompt every caption starts with (after BOS), left out of the loss.
    pub prompt_tokens: usize,
    /// Skip unreadable images (recording their indices) instead of failing.
    pub skip_bad: bool,
    pub skipped: Arc<Mutex<BTreeSet<usize>>>,
    /// A dedicated pool of `num_workers` threads for decoding (None: rayon's global pool, all cores).
    pub pool: Option<rayon::ThreadPool>,
    /// Training-time augmentation ([`BatchSource::train_batch`]; evaluation batches are never augmented).
    pub augment: Option<AugmentConfig>,
    /// Per example: whether a horizontal flip is allowed (false where its caption names a side).
    pub flip_allowed: Vec<bool>,
    /// What the captions are for (captions, VQA answers with their questions, retrieval texts).
    pub texts: Texts,
}

impl ImageCaptionSource {
    pub fn new(
        config: ImageProcessorConfig,
        images: Vec<ImageSource>,
        captions: Vec<Vec<i64>>,
        bos: i64,
        pad: i64,
        max_length: Option<usize>,
        skip_bad: bool,
    ) -> Result<Self> {
        if let Some(m) = max_length {
            check_max_length(Some(m as i64))?;
        }
        if images.len() != captions.len() {
            return Err(Error::invalid(format!(
                "{} images but {} captions; every image needs its caption",
                images.len(),
                captions.len()
            )));
        }
        Ok(Self {
            config,
            images,
            captions,
            bos,
            pad,
            max_length,
            prompt_tokens: 0,
            skip_bad,
            skipped: Arc::default(),
            pool: None,
            augment: None,
            flip_allowed: Vec::new(),
            texts: Texts::Captions,
        })
    }

    /// The source of another head: VQA answers with their questions, or retrieval texts with their image
    /// ids (one per example).
    pub fn with_texts(mut self, texts: Texts) -> Result<Self> {
        let n = match &texts {
            Texts::Captions => self.images.len(),
            Texts::Questions(q) => q.len(),
            Texts::ImageIds(ids) => ids.len(),
        };
        if n != self.images.len() {
            return Err(Error::invalid(format!(
                "{n} questions or image ids for {} images; every example needs one",
                self.images.len()
            )));
        }
        self.texts = texts;
        Ok(self)
    }

    /// The texts of examples `rows` collated for the source's head, with `pixel_values` (their images).
    fn collate(&self, rows: &[usize], pixel_values: Tensor) -> Result<Batch> {
        let captions: Vec<Vec<i64>> = rows.iter().map(|&i| self.captions[i].clone()).collect();
        match &self.texts {
            Texts::Captions => {
                let (input_ids, attention_mask, labels) = collate_prompted_captions(
                    &captions,
                    self.bos,
                    self.pad,
                    self.max_length,
                    self.prompt_tokens,
                )?;
                Ok(Batch::captions(pixel_values, input_ids, attention_mask, labels))
            }
            Texts::Questions(questions) => {
                let questions: Vec<Vec<i64>> = rows.iter().map(|&i| questions[i].clone()).collect();
                let (input_ids, attention_mask) = pad_texts(&questions, self.pad, self.max_length)?;
                let (answer, answer_mask, labels) =
                    collate_captions(&captions, self.bos, self.pad, self.max_length)?;
                Ok(Batch {
                    decoder_input_ids: Some(answer),
                    decoder_attention_mask: Some(answer_mask),
                    ..Batch::captions(pixel_values, input_ids, attention_mask, labels)
                })
            }
            Texts::ImageIds(ids) => {
                let (input_ids, attention_mask) = pad_texts(&captions, self.pad, self.max_length)?;
                let labels = input_ids.f_masked_fill(&attention_mask.f_eq(0)?, -100)?;
                let image_ids: Vec<i64> = rows.iter().map(|&i| ids[i]).collect();
                Ok(Batch {
                    image_ids: Some(Tensor::f_from_slice(&image_ids)?),
                    ..Batch::captions(pixel_values, input_ids, attention_mask, labels)
                })
            }
        }
    }

    /// Augments training batches with `augment`; `texts` (the captions as text, one per image) mark the
    /// examples never flipped: those whose caption names a side ([`names_a_side`]).
    pub fn with_augment(mut self, augment: AugmentConfig, texts: &[String]) -> Result<Self> {
        augment.validate()?;
        if texts.len() != self.images.len() {
            return Err(Error::invalid(format!(
                "{} caption texts for {} images; augmentation needs every caption's text",
                texts.len(),
                self.images.len()
            )));
        }
        self.flip_allowed = texts.iter().map(|t| !names_a_side(t)).collect();
        self.augment = Some(augment);
        Ok(self)
    }

    /// Decodes with `threads` worker threads instead of all cores.
    pub fn with_workers(mut self, threads: usize) -> Result<Self> {
        if threads < 1 {
            return Err(Error::invalid("num_workers must be at least 1"));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::invalid(format!("cannot start {threads} worker threads: {e}")))?;
        self.pool = Some(pool);
        Ok(self)
    }
}

impl BatchSource for ImageCaptionSource {
    fn len(&self) -> usize {
        self.images.len()
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        self.build(indices, None)
    }

    fn train_batch(&self, indices: &[usize], epoch: i64, seed: i64) -> Result<Batch> {
        self.build(indices, Some((seed, epoch)))
    }

    fn feature_cache_refusal(&self) -> Option<String> {
        if self.augment.is_some() {
            return Some("augment is on: every epoch draws other pixels for an image".into());
        }
        if self.skip_bad {
            return Some(
                "on_bad_sample=\"skip\" may drop rows from a batch, so its rows are not known by example"
                    .into(),
            );
        }
        None
    }

    fn train_batch_with_pixels_of(&self, indices: &[usize], with_pixels: &[bool]) -> Result<Batch> {
        if with_pixels.iter().all(|&w| w) {
            return self.batch(indices);
        }
        // Only the images whose embeddings the trainer lacks are decoded; every caption is collated.
        let decode: Vec<usize> = indices
            .iter()
            .zip(with_pixels)
            .filter(|(_, &w)| w)
            .map(|(&i, _)| i)
            .collect();
        let (h, w) = (self.config.size.height as i64, self.config.size.width as i64);
        let pixel_values = if decode.is_empty() {
            Tensor::f_zeros([0, 3, h, w], (Kind::Float, Device::Cpu))?
        } else {
            self.build(&decode, None)?.pixel_values
        };
        self.collate(indices, pixel_values)
    }
}

impl ImageCaptionSource {
    /// A batch, augmented for (seed, epoch) when given and the source augments.
    fn build(&self, indices: &[usize], run: Option<(i64, i64)>) -> Result<Batch> {
        let prepare = || match (&self.augment, run) {
            (Some(aug), Some(run)) => {
                preprocess_augmented(&self.config, aug, &self.images, indices, run, &self.flip_allowed)
            }
            _ => preprocess_selected(&self.config, &self.images, indices),
        };
        let pixels = match &self.pool {
            Some(pool) => pool.install(prepare)?,
            None => prepare()?,
        };
        let mut data =
            Vec::with_capacity(indices.len() * 3 * self.config.size.height * self.config.size.width);
        let mut kept = Vec::with_capacity(indices.len());
        for (&i, result) in indices.iter().zip(pixels) {
            match result {
                Ok(buffer) => {
                    data.extend_from_slice(&buffer);
                    kept.push(i);
                }
                Err(_) if self.skip_bad => {
                    if let Ok(mut skipped) = self.skipped.lock() {
                        skipped.insert(i);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if kept.is_empty() {
            return Err(Error::invalid(format!(
                "every image of a batch is unreadable (items {indices:?}); check the dataset"
            )));
        }
        let n = kept.len() as i64;
        let (h, w) = (self.config.size.height as i64, self.config.size.width as i64);
        let pixel_values = Tensor::f_from_slice(&data)?.f_view([n, 3, h, w])?;
        self.collate(&kept, pixel_values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_tensors_get_the_same_collation_as_captions() {
        let ids = Tensor::from_slice(&[5i64, 7, 102, 0, 5, 8, 9, 102]).view([2, 4]);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 0, 1, 1, 1, 1]).view([2, 4]);
        let pixels = Tensor::zeros([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        let data = TensorDataset::new(pixels, ids.shallow_clone(), Some(mask), None, 30522).unwrap();
        let row = |t: &Tensor, i: i64| Vec::<i64>::try_from(t.get(i)).unwrap();
        assert_eq!(row(&data.input_ids, 0), vec![30522, 7, 102, 0]);
        assert_eq!(row(&data.labels, 0), vec![30522, 7, 102, -100]);
        assert_eq!(row(&data.labels, 1), vec![30522, 8, 9, 102]);
        assert_eq!(row(&ids, 0), vec![5, 7, 102, 0]); // the caller's tensor is untouched
    }

    #[test]
    fn augmented_batches_depend_only_on_seed_epoch_and_example() {
        use crate::processor::{ImageSize, PixelMode};
        let images: Vec<ImageSource> = (0..5)
            .map(|i| ImageSource::Raw {
                mode: PixelMode::RGB,
                width: 40 + i,
                height: 30,
                data: (0..(40 + i) * 30 * 3).map(|v| (v * 7 + i * 13) as u8).collect(),
            })
            .collect();
        let config = ImageProcessorConfig {
            size: ImageSize {
                height: 24,
                width: 24,
            },
            ..Default::default()
        };
        let texts: Vec<String> = (0..5).map(|i| format!("caption {i}")).collect();
        let source = |workers| {
            let s = ImageCaptionSource::new(
                config.clone(),
                images.clone(),
                vec![vec![101, 5, 102]; 5],
                30522,
                0,
                None,
                false,
            )
            .unwrap()
            .with_augment(AugmentConfig::default(), &texts)
            .unwrap();
            s.with_workers(workers).unwrap()
        };
        let (one, three) = (source(1), source(3));
        let all = one.train_batch(&[0, 1, 2, 3, 4], 2, 7).unwrap().pixel_values;
        assert!(all.equal(&three.train_batch(&[0, 1, 2, 3, 4], 2, 7).unwrap().pixel_values));
        let some = three.train_batch(&[3, 1], 2, 7).unwrap().pixel_values;
        assert!(some.equal(&all.index_select(0, &Tensor::from_slice(&[3i64, 1]))));
        assert!(!all.equal(&one.train_batch(&[0, 1, 2, 3, 4], 3, 7).unwrap().pixel_values));
        // Evaluation batches are the plain preprocessing.
        let plain = ImageCaptionSource::new(
            config.clone(),
            images.clone(),
            vec![vec![101, 5, 102]; 5],
            30522,
            0,
            None,
            false,
        )
        .unwrap();
        assert!(one
            .batch(&[0, 4])
            .unwrap()
            .pixel_values
            .equal(&plain.batch(&[0, 4]).unwrap().pixel_values));
    }

    #[test]
    fn prompted_collation_masks_the_prompt() {
        let caps = [vec![101, 1, 2, 5, 6, 102], vec![101, 1, 2, 7, 102]];
        let (ids, mask, labels) = collate_prompted_captions(&caps, 30522, 0, None, 2).unwrap();
        let row = |t: &Tensor, i: i64| Vec::<i64>::try_from(t.get(i)).unwrap();
        assert_eq!(row(&ids, 1), vec![30522, 1, 2, 7, 102, 0]);
        assert_eq!(row(&mask, 1), vec![1, 1, 1, 1, 1, 0]);
        assert_eq!(row(&labels, 0), vec![30522, -100, -100, 5, 6, 102]);
        assert_eq!(row(&labels, 1), vec![30522, -100, -100, 7, 102, -100]);
        let (_, _, plain) = collate_prompted_captions(&caps, 30522, 0, None, 0).unwrap();
        assert_eq!(row(&plain, 0), vec![30522, 1, 2, 5, 6, 102]);
    }

    #[test]
    fn collation_sets_bos_masks_pads_and_truncates() {
        let (ids, mask, labels) = collate_captions(
            &[
                vec![101, 5, 6, 102],
                vec![101, 7, 102],
                vec![101, 1, 2, 3, 4, 102],
            ],
            30522,
            0,
            Some(5),
        )
        .unwrap();
        assert_eq!(ids.size(), [3, 5]);
        assert_eq!(
            Vec::<i64>::try_from(ids.get(0)).unwrap(),
            vec![30522, 5, 6, 102, 0]
        );
        assert_eq!(
            Vec::<i64>::try_from(labels.get(1)).unwrap(),
            vec![30522, 7, 102, -100, -100]
        );
        assert_eq!(
            Vec::<i64>::try_from(ids.get(2)).unwrap(),
            vec![30522, 1, 2, 3, 102]
        );
        assert_eq!(Vec::<i64>::try_from(mask.get(1)).unwrap(), vec![1, 1, 1, 0, 0]);
    }
}
