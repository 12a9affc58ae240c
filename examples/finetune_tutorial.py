"""The "Fine-tuning BLIP using PEFT" tutorial, with only its imports swapped from transformers + peft to
blip_peft. It runs offline on the bundled base model and an imagefolder dataset from the synthetic world.

    python examples/finetune_tutorial.py                 # the tutorial's settings, on the bundled model
    BLIP_TUTORIAL_EPOCHS=1 python examples/finetune_tutorial.py    # a quick run
"""

import os
import tempfile

import torch
from datasets import load_dataset
from torch.utils.data import DataLoader, Dataset

# was: from transformers import AutoModelForVision2Seq, AutoProcessor / from peft import LoraConfig, get_peft_model
# (bundled_model_path and world are the offline stand-ins for the hub model and dataset)
from blip_peft import AutoModelForVision2Seq, AutoProcessor, LoraConfig, bundled_model_path, get_peft_model, world

MODEL_ID = bundled_model_path()  # was: "Salesforce/blip-image-captioning-base"
EPOCHS = int(os.environ.get("BLIP_TUTORIAL_EPOCHS", "50"))
WORK = os.environ.get("BLIP_TUTORIAL_DIR") or tempfile.mkdtemp(prefix="blip-tutorial-")
DATA_DIR = world.write_imagefolder(os.path.join(WORK, "data"), n=6, seed=7, domain="target", size=128)

config = LoraConfig(
    r=16,
    lora_alpha=32,
    lora_dropout=0.05,
    bias="none",
    # target specific modules (look for Linear in the model); print(model) to see the architecture
    target_modules=["self.query", "self.key", "self.value", "self_attn.qkv"],
)

# loading the model in float16
model = AutoModelForVision2Seq.from_pretrained(MODEL_ID, torch_dtype=torch.float16)

# Load the blip model processor
processor = AutoProcessor.from_pretrained(MODEL_ID)

# We layer our PEFT on top of our model using the PEFT config
model = get_peft_model(model, config)
model.print_trainable_parameters()

# The tutorial loads "ybelkada/football-dataset" (6 images); here: 6 images of the world's target domain
dataset = load_dataset("imagefolder", data_dir=DATA_DIR, split="train")
print("Dataset images: ", len(dataset))


class ImageCaptioningDataset(Dataset):
    def __init__(self, dataset, processor):
        self.dataset = dataset
        self.processor = processor

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        item = self.dataset[idx]
        encoding = self.processor(images=item["image"], padding="max_length", return_tensors="pt")
        # remove batch dimension
        encoding = {k: v.squeeze() for k, v in encoding.items()}
        encoding["text"] = item["text"]
        return encoding


def collator(batch):
    # pad the input_ids and attention_mask
    processed_batch = {}
    for key in batch[0].keys():
        if key != "text":
            processed_batch[key] = torch.stack([example[key] for example in batch])
        else:
            text_inputs = processor.tokenizer(
                [example["text"] for example in batch], padding=True, return_tensors="pt"
            )
            processed_batch["input_ids"] = text_inputs["input_ids"]
            processed_batch["attention_mask"] = text_inputs["attention_mask"]
    return processed_batch


train_dataset = ImageCaptioningDataset(dataset, processor)
train_dataloader = DataLoader(train_dataset, shuffle=True, batch_size=2, collate_fn=collator)

optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)

device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device)
model.train()

losses = []
for epoch in range(EPOCHS):
    print("Epoch:", epoch)
    for idx, batch in enumerate(train_dataloader):
        input_ids = batch.pop("input_ids").to(device)
        pixel_values = batch.pop("pixel_values").to(device, torch.float16)
        attention_mask = batch.pop("attention_mask").to(device)

        outputs = model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, labels=input_ids
        )

        loss = outputs.loss
        print("Loss:", loss.item())
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

        if idx % 10 == 0:
            generated_output = model.generate(pixel_values=pixel_values)
            print(processor.batch_decode(generated_output, skip_special_tokens=True))

# hugging face models saved to the directory
save_dir = os.path.join(WORK, "training", "caption")
print("Saving to", save_dir)
model.save_pretrained(save_dir)

# Then we can load it for inference: the adapter folder names its base model
model = AutoModelForVision2Seq.from_pretrained(save_dir)
model.eval()
images = [dataset[0]["image"]]
processed = processor(images=images, padding="max_length", return_tensors="pt")
generated_output = model.generate(pixel_values=processed["pixel_values"], max_new_tokens=64)
print(processor.batch_decode(generated_output, skip_special_tokens=True))
print(f"first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}")
