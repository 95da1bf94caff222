"""Brain-tissue segmentation by class description, no clicks: CILMP class prompts on a small SAM.

Grey matter, white matter and CSF are described in words and encoded by the bundled MiniLM; the CILMP
prompt head turns each description into a SAM prompt token conditioned on the image. Trained on axial
slices of the MNI152 template, scored with held-out Dice per class, and compared with the same head fed
fixed random class vectors instead of the language model's.

    python examples/cilmp_sam_tissue.py --out runs/cilmp_sam_tissue
    python examples/cilmp_sam_tissue.py --help

The logic lives in ``medadapt.prompts.tissue_demo``.
"""

from medadapt.prompts.tissue_demo import main

if __name__ == "__main__":
    main()
