"""Kandinsky 2.2 on Triton, by concern:

- `generator/`: the model repository generator (`kandinsky-repository`), every flavour;
- `serving/`: `kandinsky-serve` (the Triton process, its supervisor, deep health, the engine cache);
- `gateway/`: `kandinsky-gateway` (nginx + njs in front of Triton, and its gRPC stream relay);
- `openai_api/`: `kandinsky-openai` (the OpenAI Images API and the playground page; kandinsky-serve runs it);
- `python_models/`: the code that runs inside Triton's python backend (it imports the core only);
- `settings.py`, `admin.py`: the serving defaults and the admin key, shared by the server and the gateway.
"""
