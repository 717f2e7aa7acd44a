"""UFF contrastive fusion pretraining (docs/uff_pretraining.md) on the dumps of ``main.py --save_feature``.

    python fusion_pretrain.py --data_path datasets/patch_lib --batch_size 16 --accum_iter 16 --lr 0.003
    torchrun --nproc_per_node=N fusion_pretrain.py ...
    python -m torch.distributed.launch --nproc_per_node=N fusion_pretrain.py ...

See docs/uff_pretraining.md; installed as the ``m3dm-pretrain`` command; the work is done by ``m3dm.app.pretrain``.
"""

import sys

from m3dm.app.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
