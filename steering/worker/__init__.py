"""The worker side: what runs inside vLLM's worker processes — the shim that installs steering
(:mod:`.vllm_shim`), the batched op and its slot-stacked tables (:mod:`.runtime`), where the op sits
in each decoder layer (:mod:`.sites`), slot allocation and the API server's slot gate
(:mod:`.slots`), and activation readouts (:mod:`.readouts`). It imports the request-side core
(to compile and decode steering), never the pack builders (an import-linter contract)."""
