"""MambaMIM pretraining of a hybrid CNN–Mamba 3D encoder, then a pretrained-vs-random fine-tuning check.

    python examples/pretrain_mambamim.py --out runs/mambamim --finetune
    python examples/pretrain_mambamim.py --help

The logic lives in ``medadapt.mim.pretrain`` (also behind ``medadapt pretrain``).
"""

from medadapt.mim.pretrain import main

if __name__ == "__main__":
    main()
