//! The bodies of the file-loader fuzz targets, written once: `fuzz/fuzz_targets/*.rs` (cargo-fuzz, run for
//! millions of executions outside CI: `make fuzz`) and `tests/fuzz_seeded.rs` (a short seeded run over the
//! committed corpus in `cargo test`) both call these. Each takes any bytes and must return without
//! panicking: a loader gives a checked value or an `Error`; what loads must also survive its round trip.
#![doc(hidden)]

use std::path::PathBuf;

use crate::config::BlipConfig;
use crate::lora::LoraConfig;
use crate::processor::{
    load_rgb, preprocess_images, BlipTokenizer, ImageProcessorConfig, ImageSource, Padding, PixelMode,
    TokenizeOptions,
};
use crate::weights::SafetensorsFiles;

/// For the cargo-fuzz targets: libFuzzer's Rust glue aborts in its panic hook, which would count a panic a
/// loader catches on purpose (the tokenizers crate panics on some malformed files; ours turns that into an
/// error) as a crash. A quiet hook instead; a panic that escapes a target still aborts the run (the glue's
/// `catch_unwind` around every input).
pub fn allow_caught_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|_| {})));
}

/// A fuzz target's body: any bytes in, no panic out.
pub type Target = fn(&[u8]);

/// The loaders, by the names of their fuzz targets and corpus folders.
pub const TARGETS: [(&str, Target); 6] = [
    ("config_json", config_json),
    ("processor_config_json", processor_config_json),
    ("adapter_config_json", adapter_config_json),
    ("safetensors", safetensors),
    ("tokenizer_json", tokenizer_json),
    ("image", image),
];

/// `config.json`: a checked `BlipConfig` or an error; a config that loads writes back a document that loads
/// to the same settings.
pub fn config_json(data: &[u8]) {
    let Ok(raw) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(config) = BlipConfig::from_json(raw) {
        let again = BlipConfig::from_json(config.to_json()).expect("a loaded config's own JSON must load");
        assert_eq!(again.to_json(), config.to_json());
        let _ = config.num_image_tokens();
    }
}

/// `preprocessor_config.json` (or the `image_processor` entry of `processor_config.json`): checked image
/// processor settings or an error; settings that load write back a document that loads to the same settings,
/// and preprocess a small image (when the output they ask for is small) to pixels or an error.
pub fn processor_config_json(data: &[u8]) {
    let Ok(raw) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let raw = match raw {
        serde_json::Value::Object(mut map) if map.contains_key("image_processor") => {
            map.remove("image_processor").unwrap_or_default()
        }
        other => other,
    };
    let Ok(config) = ImageProcessorConfig::from_json(raw) else {
        return;
    };
    let again =
        ImageProcessorConfig::from_json(config.to_json()).expect("a loaded config's own JSON must load");
    assert_eq!(again.settings(), config.settings());
    let _ = config.with_overrides(serde_json::json!({"do_resize": true, "size": 24}));
    // A 5x7 image through the settings, unless they ask for an output too large to make on every input.
    let small = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_u64()).is_some_and(|n| n <= 64);
    let size = config.settings()["size"].clone();
    let fits = match &size {
        serde_json::Value::Object(m) => small(m.get("height")) && small(m.get("width")),
        other => small(Some(other)),
    };
    if fits || !config.settings()["do_resize"].as_bool().unwrap_or(true) {
        let image = ImageSource::Raw {
            mode: PixelMode::RGB,
            width: 5,
            height: 7,
            data: [10, 20, 30].repeat(35),
        };
        let _ = preprocess_images(&config, &[image]);
    }
}

/// `adapter_config.json` (peft's LoraConfig): a checked config or an error; a valid config normalises to a
/// document that loads to the same config, and matching module paths against it never panics.
pub fn adapter_config_json(data: &[u8]) {
    let Ok(raw) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(config) = LoraConfig::from_json(&raw) {
        if config.validate().is_ok() {
            let again = LoraConfig::from_json(&config.to_json()).expect("a normalised config must load");
            assert_eq!(again.to_json(), config.to_json());
            for path in [
                "text_decoder.bert.encoder.layer.1.attention.self.query",
                "vision_model.encoder.layers.0.self_attn.qkv",
                "vision_model.embeddings.patch_embedding",
            ] {
                let _ = crate::lora::inject::is_targeted(&config, path, true);
                let _ = config.rank_alpha(path);
            }
        }
    }
}

fn shard_path(i: usize) -> PathBuf {
    let dir = std::env::var_os("FUZZ_TMP").map_or_else(std::env::temp_dir, PathBuf::from);
    let thread = format!("{:?}", std::thread::current().id());
    let thread: String = thread.chars().filter(char::is_ascii_digit).collect();
    dir.join(format!(
        "blip_peft_fuzz_{}_{thread}_{i}.safetensors",
        std::process::id()
    ))
}

fn read_all(files: &SafetensorsFiles) {
    let names: Vec<String> = files.names().cloned().collect();
    for name in &names {
        let shape = files.shape(name);
        let kind = files.kind(name);
        if let (Ok(Some(shape)), Ok(Some(_)), Ok(Some(t))) = (shape, kind, files.read(name)) {
            assert_eq!(
                t.size(),
                shape,
                "{name}: the tensor read has the shape its header lists"
            );
        }
    }
}

/// safetensors files and shards as the loaders read them (our index over the `safetensors` crate, the dtype
/// mapping, tensors read into libtorch). The first byte picks where the rest is cut into two shards; the
/// whole as one file and the two shards together either open or fail with an error, and every tensor an
/// opened set lists is read or refused.
pub fn safetensors(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let cut = (split as usize * rest.len() / 255).min(rest.len());
    let (a, b) = rest.split_at(cut);
    let paths = [shard_path(0), shard_path(1)];
    let write =
        |i: usize, bytes: &[u8]| std::fs::write(&paths[i], bytes).expect("the fuzz folder is writable");
    write(0, rest);
    if let Ok(files) = SafetensorsFiles::open(&paths[..1]) {
        read_all(&files);
    }
    write(0, a);
    write(1, b);
    if let Ok(files) = SafetensorsFiles::open(&paths) {
        read_all(&files);
    }
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
}

/// `tokenizer.json`: BLIP's (WordPiece) tokenizer or an error; one that loads encodes and decodes captions
/// with transformers' padding and truncation options.
pub fn tokenizer_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(tokenizer) = BlipTokenizer::from_json(text) else {
        return;
    };
    let texts = ["a picture of a red cube", "", "ünïcödé ## [SEP] [PAD] \u{1F600}"];
    for (padding, truncation, left) in [
        (Padding::Longest, None, false),
        (Padding::MaxLength(4), Some(3), true),
    ] {
        let opts = TokenizeOptions {
            add_special_tokens: true,
            padding,
            pad_to_multiple_of: Some(3),
            truncation,
            pad_left: left,
            truncate_left: left,
            pad_id: 0,
            pad_token: "[PAD]".into(),
        };
        if let Ok(enc) = tokenizer.encode_batch(&texts, &opts) {
            assert_eq!(enc.input_ids.len(), texts.len());
            let _ = tokenizer.decode_batch(&enc.input_ids, true, true);
        }
    }
    let _ = tokenizer.to_json(false);
    let _ = tokenizer.vocab_size(true);
}

/// Encoded images of every format the processor reads (JPEG through libjpeg-turbo's decoder in jpeg.rs;
/// PNG, GIF, BMP, WebP, TIFF through `image`) through our code around the decoders (format sniffing, CMYK and palettes, PIL's RGB
/// conversion, the pixel limit): RGB pixels within the limit, or an error.
pub fn image(data: &[u8]) {
    const LIMIT: u64 = 1 << 20;
    if let Ok(rgb) = load_rgb(&ImageSource::Encoded(data.to_vec()), Some(LIMIT)) {
        assert!((rgb.width as u64) * (rgb.height as u64) <= LIMIT);
        assert!(rgb.data.len() >= rgb.width * rgb.height * 3);
    }
}
