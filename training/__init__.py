"""training: what the instrumented loop in `train.py` stands on.

- `models`: the networks, their recipe (SGD, warm-up then cosine) and `Stepper`, which runs one step;
- `timing`: one clock for the data wait and the step, per-epoch figures (img/s, data wait, AU);
- `stages`: the loaders' per-stage times per epoch, the verdict (`bound_by`) and the what-if figures;
- `results`: the seed's CSV and run.json's writing and provenance; `runinfo`: what run.json says;
- `distributed`: torchrun's environment, the process group and how ranks share an epoch out;
- `device`: the device a run computes on and the CPU thread policy;
- `data`: the dataset checked and the loaders built; `output`: the output directory;
- `interrupts`: one handler for Ctrl-C and SIGTERM for the whole run; `trace`: which samples each rank saw.

It imports the data core (`feedrate`) and the loader protocol (`loaders`), never the test rig.
"""
