//! The text encoder (`BlipTextModel::encode`, transformers' `BlipTextModel` with `is_decoder=False`) against
//! transformers itself: the Python interpreter on PATH builds a tiny BlipTextModel with random weights,
//! writes its state dict, inputs and outputs as safetensors, and the Rust tower loaded from those weights must
//! give the same last hidden states (float32, 1e-5 relative): without cross-attention (retrieval's ITC),
//! with it over encoder states (VQA's question encoding, ITM) with and without an encoder padding mask, and
//! from `inputs_embeds`. (transformers 5.17 drops `encoder_attention_mask` on its way to the cross-attention;
//! the masked case is checked against transformers with the mask passed through.) Skipped, saying so, where no Python with transformers is found.

mod common;

use std::path::Path;
use std::process::Command;

use blip_peft::blip::text::{BlipTextModel, TextInput};
use blip_peft::config::BlipTextConfig;
use blip_peft::nn::ForwardContext;
use blip_peft::weights::{CheckpointSource, SafetensorsFiles};
use tch::{Device, Kind, Tensor};

const ORACLE: &str = r#"
import sys, torch
from safetensors.torch import save_file
from transformers import BlipTextConfig
from transformers.models.blip.modeling_blip_text import BlipTextAttention, BlipTextModel

out = sys.argv[1]
torch.manual_seed(0)
config = BlipTextConfig(
    vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=40, encoder_hidden_size=24, initializer_range=0.02, bos_token_id=97,
    sep_token_id=3, pad_token_id=0,
)
model = BlipTextModel(config, add_pooling_layer=False).eval()
with torch.no_grad():
    for p in model.parameters():  # biases and LayerNorms away from 0 / 1, so no term hides
        p.add_(torch.randn_like(p) * 0.02)
state = {"text_encoder." + k: v.contiguous() for k, v in model.state_dict().items()}
save_file(state, f"{out}/model.safetensors")
ids = torch.randint(1, 99, (3, 7))
mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
states = torch.randn(3, 9, 24)
states_mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 2 + [0] * 7])
embeds = torch.randn(3, 7, 32) * 0.02
with torch.no_grad():
    io = {
        "ids": ids, "mask": mask, "states": states, "states_mask": states_mask, "embeds": embeds,
        "plain": model(input_ids=ids, attention_mask=mask).last_hidden_state,
        "unmasked": model(input_ids=ids).last_hidden_state,
        "cross": model(input_ids=ids, attention_mask=mask, encoder_hidden_states=states).last_hidden_state,
        "cross_mask_dropped": model(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=states,
            encoder_attention_mask=states_mask,
        ).last_hidden_state,
        # (a copy: transformers adds the position embeddings into the given tensor in place)
        "from_embeds": model(inputs_embeds=embeds.clone(), attention_mask=mask).last_hidden_state,
    }

# transformers 5.17's BlipTextAttention does not hand `encoder_attention_mask` on to its cross-attention (the
# mask is dropped: "cross_mask_dropped" equals "cross"). The masked reference passes it through.
def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, past_key_values=None, **kw):
    cross = encoder_hidden_states is not None
    context, probs = self.self(
        hidden_states, attention_mask=None if cross else attention_mask,
        encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=attention_mask if cross else None,
        past_key_values=past_key_values,
    )
    return self.output(context, hidden_states), probs

BlipTextAttention.forward = forward
with torch.no_grad():
    io["cross_masked"] = model(
        input_ids=ids, attention_mask=mask, encoder_hidden_states=states, encoder_attention_mask=states_mask,
    ).last_hidden_state
save_file({k: v.contiguous() for k, v in io.items()}, f"{out}/io.safetensors")
"#;

fn config() -> BlipTextConfig {
    BlipTextConfig {
        encoder_hidden_size: 24,
        ..common::tiny_text()
    }
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let diff = f64::try_from((a - b).abs().max()).unwrap();
    let scale = f64::try_from(b.abs().max()).unwrap();
    diff / scale
}

#[test]
fn text_encoder_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let run = Command::new("python")
        .arg("-c")
        .arg(ORACLE)
        .arg(dir.path())
        .output();
    let ok = matches!(&run, Ok(out) if out.status.success());
    if !ok {
        let why = match &run {
            Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
            Err(e) => e.to_string(),
        };
        if why.contains("ModuleNotFoundError") || run.is_err() {
            eprintln!("skipped: no Python with transformers on PATH ({})", why.trim());
            return;
        }
        panic!("the transformers oracle failed: {why}");
    }
    let files = SafetensorsFiles::open_folder(dir.path()).unwrap();
    let mut src = CheckpointSource::new(&files, Kind::Float, Device::Cpu);
    let tower = BlipTextModel::load(&mut src, "text_encoder", &config()).unwrap();
    src.finish().unwrap();
    let io: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(Path::new(&dir.path().join("io.safetensors")))
            .unwrap()
            .into_iter()
            .collect();
    let cx = ForwardContext::INFERENCE;
    let ids = &io["ids"];
    let mask = &io["mask"];
    let states = &io["states"];
    let _guard = tch::no_grad_guard();
    let cases = [
        ("plain", tower.encode(TextInput::Ids(ids), Some(mask), None, &cx)),
        ("unmasked", tower.encode(TextInput::Ids(ids), None, None, &cx)),
        (
            "cross",
            tower.encode(TextInput::Ids(ids), Some(mask), Some((states, None)), &cx),
        ),
        (
            "cross_masked",
            tower.encode(
                TextInput::Ids(ids),
                Some(mask),
                Some((states, Some(&io["states_mask"]))),
                &cx,
            ),
        ),
        (
            "from_embeds",
            tower.encode(TextInput::Embeds(&io["embeds"]), Some(mask), None, &cx),
        ),
    ];
    for (name, got) in cases {
        let got = got.unwrap();
        let want = &io[name];
        assert_eq!(got.size(), want.size(), "{name}");
        let rel = max_rel(&got, want);
        assert!(rel <= 1e-5, "{name}: max relative difference {rel}");
    }
    // The padding mask matters (a wrong mask would not be caught by equal outputs otherwise).
    assert!(max_rel(&io["plain"], &io["unmasked"]) > 1e-3);
    assert!(max_rel(&io["cross"], &io["cross_masked"]) > 1e-3);
    // transformers' own BlipTextModel ignores encoder_attention_mask (what VQA's parity relies on: its
    // decoder attends to every question position, padding included). A newer transformers that honours it
    // fails here, which says to revisit `BlipForQuestionAnswering`'s decoder.
    assert_eq!(max_rel(&io["cross"], &io["cross_mask_dropped"]), 0.0);
}

#[test]
fn text_encoder_refuses_bad_masks() {
    let _rng = common::global_rng();
    let mut src = blip_peft::nn::RandomInit::new(0, Kind::Float, Device::Cpu);
    let tower = BlipTextModel::load(&mut src, "text_encoder", &config()).unwrap();
    let ids = Tensor::ones([2, 5], (Kind::Int64, Device::Cpu));
    let cx = ForwardContext::INFERENCE;
    let bad = Tensor::ones([2, 4], (Kind::Int64, Device::Cpu));
    let err = tower
        .encode(TextInput::Ids(&ids), Some(&bad), None, &cx)
        .unwrap_err();
    assert!(err.to_string().contains("attention_mask"), "{err}");
    let states = Tensor::zeros([2, 3, 24], (Kind::Float, Device::Cpu));
    let err = tower
        .encode(TextInput::Ids(&ids), None, Some((&states, Some(&bad))), &cx)
        .unwrap_err();
    assert!(err.to_string().contains("encoder_attention_mask"), "{err}");
}
