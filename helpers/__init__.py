"""Helper modules of the TwistNet-2D scripts; imported from the repo root, nothing to install.

The scripts at the top level (train.py, run_all.py, ...) import these and the three shared
modules models.py, datasets.py and transforms.py, never each other:

    errors       the user-error type (one `error:` line, exit 2)
    utils        plumbing: errors, devices and precision, atomic files, logs, seeding, progress
    model_tools  hooks, gates, slimming, FLOP counting, trained checkpoints -> models
    recipes      the training recipe: presets, optimizer groups, schedule, EMA, Mixup/CutMix
    train_cli    train.py's command line and run names (the contract run_all.py sweeps with)
    runrecords   reading run directories: RunResult, Stats, the summarised cells
    loading      decoding, Dataset classes, seeded samplers, loaders
    synthtex     the built-in procedural texture dataset
    download     resumable, checked dataset downloads and safe unpacking
    rundirs      run locks, safe checkpoint reading, children that die with their sweep
    launchers    local, SLURM and submitit launching for run_all.py
    distributed  the torch.distributed trainer shared by both pretraining scripts
    spark        SparK masked image modelling: masks, the sparse encoder, the decoder
    figures      matplotlib style and saving for paper figures
    lrfind       the learning-rate range test (torch-lr-finder)
"""
