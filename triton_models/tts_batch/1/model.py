"""Whole-utterance TTS with dynamic batching; Triton's response cache serves repeats.

With the chunked engine each request goes through `tts_stream`'s scheduler at bulk
priority (a decoupled BLS call, the requests of a batch side by side), so bulk work
fills what live streams leave and never delays their due chunks. With the sentence
engine this model synthesises on its own engine.
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb

from ttsfleet.serving.backend import (
    Metrics,
    error_message,
    load,
    outputs,
    read_request,
    through_stream,
)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in (config.get("parameters") or {}).items()}
        self.through_stream = params.get("engine") == "chunked"
        self.engine = None
        self.voice = params.get("voice", "en_US-joe-medium")
        if self.through_stream:
            self.pool = ThreadPoolExecutor(max(1, int(config.get("max_batch_size") or 1)))
            pb.Logger.log_info(f"{config['name']}: chunked engine, through tts_stream at bulk")
        else:
            self.engine, _ = load(pb, args)
            self.voice = self.engine.voice_name
        self.metrics = Metrics(pb, config["name"])

    def execute(self, requests):
        if self.through_stream:
            return list(self.pool.map(self._one, requests))
        return [self._one(request) for request in requests]

    def _one(self, request):
        arrived = time.perf_counter()
        # Through tts_stream, the request is an open stream there (counted once).
        counted = 0 if self.through_stream else 1
        self.metrics.inflight.increment(counted)
        try:
            req = read_request(pb, request, self.voice, priority="bulk")
            if self.engine is None:
                audio, sample_rate = through_stream(pb, req)
            else:
                audio = self.engine.synthesize(req.text, req.rate)
                sample_rate = self.engine.sample_rate
            self.metrics.ttfa.observe(time.perf_counter() - arrived)
            if self.engine is not None:  # through tts_stream, counted there
                self.metrics.audio_seconds.increment(len(audio) / sample_rate)
            return pb.InferenceResponse(output_tensors=outputs(pb, audio, sample_rate, True))
        except Exception as err:  # this request fails; the rest of the batch does not
            return pb.InferenceResponse(error=pb.TritonError(error_message(err)))
        finally:
            self.metrics.inflight.increment(-counted)

    def finalize(self):
        if self.through_stream:
            self.pool.shutdown(wait=False)
