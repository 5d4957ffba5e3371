"""The jobs behind the commands, as library functions: each takes a typed config and returns a result.

`sample.run(SampleConfig)`, `evaluate.run(EvalConfig)`, `tune.run(TuneConfig)`,
`prepare.run(PrepareConfig)`; the CLI only parses flags into these configs and prints.
"""
