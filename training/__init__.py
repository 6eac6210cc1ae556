"""training: what the instrumented loop in `train.py` stands on.

The model and its recipe (`models`), torch.distributed (`distributed`), one clock for data wait and step
(`timing`), the seed's CSV and run.json (`results`). It imports the data core (`feedrate`) and the loader
protocol (`loaders`), never the test rig.
"""
