"""Worker processes of `python -m lora3.bench`: each measures one setup in a fresh process.

`common` holds the model sizes and the helpers every worker shares; `keras_worker` runs the
Keras setups (JAX or TensorFlow, chosen by `KERAS_BACKEND` before keras is imported);
`peft_worker` runs the PyTorch + PEFT setups. A worker reads one JSON spec from argv and
writes one JSON result to the path the spec names.
"""
