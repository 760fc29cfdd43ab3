"""Built-in models: the SFT recipe that builds tropd's tiny teachers and students
(`sft`), the ones named `builtin:<task>:<role>` (`builtin`), the `chain` teacher and its
mismatched students with the measurement of how far apart they start (`mismatch`), the
copies shipped as package data (`shipped`, in the folder `shipped/`) and the on-disk cache
of the ones built here (`cache`). They train models and use the teacher scorer, so they
sit above `tasks` and `teacher`."""
