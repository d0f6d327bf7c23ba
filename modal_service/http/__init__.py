"""The HTTP layer: the app factory (:mod:`.app`), the guard in front of every route (:mod:`.guard`),
the request lifecycle every route follows (:mod:`.lifecycle`), and one router per API
(:mod:`.generate_api`, :mod:`.openai_api`)."""
