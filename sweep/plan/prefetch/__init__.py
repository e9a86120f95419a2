"""`sweep prefetch STUDY`: everything a study's trials read from the network, fetched before the sweep.

What trials would otherwise fetch, and where it goes:

- hub models: `snapshot_download` of the files a trial loads (config, tokenizer, top-level safetensors
  and their index, generation config; `*.py` with trust_remote_code) into the Hugging Face hub cache
  (HF_HUB_CACHE). Subfolders (Llama-3's `original/`, onnx/, ...) and .bin/.pth duplicates are skipped;
  a repository without safetensors gets its .bin weights instead. Local models are checked, not copied.
- calibration windows: built through `engine.data.calibration.calibration_set`, the function a trial
  calls, into the cache directory the trial reads (`<study dir>/cache` for a local study directory,
  else `$SWEEP_CACHE_DIR/calibration` on each node), once per tokenizer: models sharing a tokenizer
  share windows. A trial then reads them and never opens the text source.
- hub evaluation text: tokenized through `engine.trial.evaluation_tokens` into the same cache
  (`<cache>/evaluation`); local text is read from its files at trial time.
- lm-eval tasks: instantiated through the TaskManager a trial uses, so `datasets` stores their data in
  its cache (HF_DATASETS_CACHE); tasks whose data are local files need nothing.

`plan_prefetch` is pure (it reads the study and the local files that enter trial keys);
`run_prefetch` does the work in this process; `sweep.execution.prefetch_nodes` runs it on every alive Ray node.
Every item is attempted and every failure reported (a gated model does not hide a missing dataset).
Afterwards `sweep run STUDY --offline` runs with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1.
"""
