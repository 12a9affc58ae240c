"""Data-parallel LoRA fine-tuning with torchrun.

One machine, several GPUs (NCCL):
    torchrun --nproc_per_node=8 examples/train_ddp.py --model <folder> --data <folder>
Several machines (run on each):
    torchrun --nnodes=2 --node_rank=<0|1> --nproc_per_node=8 \\
        --master_addr=<host of node 0> --master_port=29500 examples/train_ddp.py --model ... --data ...
CPU only (gloo), e.g. to try it:
    torchrun --nproc_per_node=2 examples/train_ddp.py --model <folder> --data <folder>

`batch_size` is per process: the global batch is batch_size x processes. Only rank 0 prints and saves.
"""

from __future__ import annotations

import argparse

import torch

import blip_peft as bp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a transformers BLIP checkpoint folder")
    parser.add_argument("--data", required=True, help="an imagefolder (metadata.jsonl with file_name and text)")
    parser.add_argument("--output-dir", default="./training/ddp")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    args = parser.parse_args()

    bp.distributed.init_process_group()  # NCCL on GPUs, gloo on CPUs; torchrun provides the rendezvous
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    processor = bp.AutoProcessor.from_pretrained(args.model)
    model = bp.BlipForConditionalGeneration.from_pretrained(args.model, device=device)
    torch.manual_seed(0)  # the same initial adapter on every process
    model = bp.get_peft_model(
        model, bp.LoraConfig(r=16, lora_alpha=32, target_modules=["self.query", "self.value", "self_attn.qkv"])
    )
    dataset = bp.ImageCaptionDataset.from_folder(args.data)
    result = bp.train(
        model,
        processor,
        dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        output_dir=args.output_dir,
    )
    if bp.distributed.is_main_process():
        print(f"trained {result.global_step} steps; adapter in {result.adapter_path}")


if __name__ == "__main__":
    main()
