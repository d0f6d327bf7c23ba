"""The engine layer: vLLM's ``AsyncLLM`` (:mod:`.engine`), its patches (:mod:`.vllm_patches`), chat
rendering (:mod:`.prompts`) and request execution (:mod:`.generator`: plan, generate, verify, fold)."""
