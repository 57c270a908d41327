"""Write a vitlab data source as WebDataset shards; the same command as ``vitlab-shards``.

    python scripts/make_shards.py data=cifar10 data.root=../shared/data/cifar10-subset output_dir=shards/cifar10
    python scripts/make_shards.py data=imagefolder data.root=/data/imagenet output_dir=/data/imagenet-shards

Options (conf/shards.yaml): splits=[train,val,test] shard_size=10000 shard_max_bytes=3e9 verify=true overwrite=false
"""

from __future__ import annotations

from vitlab.cli.shards import main

if __name__ == "__main__":
    main()
