"""Whole-utterance TTS with dynamic batching; Triton's response cache serves repeats.

With the chunked engine each request goes through `tts_stream`'s scheduler at bulk
priority (decoupled BLS calls, the requests of a batch sent side by side from this
model's own thread), so bulk work fills what live streams leave and never delays their
due chunks. With the sentence engine this model synthesises on its own engine.
"""

import asyncio
import json
import time

import triton_python_backend_utils as pb

from ttsfleet.serving.backend import (
    Metrics,
    error_message,
    joined,
    load,
    outputs,
    read_request,
    stream_call,
)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in (config.get("parameters") or {}).items()}
        self.through_stream = params.get("engine") == "chunked"
        self.engine = None
        self.voice = params.get("voice", "en_US-joe-medium")
        if self.through_stream:
            pb.Logger.log_info(f"{config['name']}: chunked engine, through tts_stream at bulk")
        else:
            self.engine, _ = load(pb, args)
            self.voice = self.engine.voice_name
        self.metrics = Metrics(pb, config["name"])

    async def execute(self, requests):
        if not self.through_stream:
            return [self._synthesize(request) for request in requests]
        return await asyncio.gather(*(self._through_stream(request) for request in requests))

    async def _through_stream(self, request):
        # Through tts_stream: the request is an open stream there (counted once there).
        arrived = time.perf_counter()
        try:
            req = read_request(pb, request, self.voice, priority="bulk")
            responses = await stream_call(pb, req).async_exec(decoupled=True)
            audio, sample_rate = joined(pb, responses)
            self.metrics.ttfa.observe(time.perf_counter() - arrived)
            return pb.InferenceResponse(output_tensors=outputs(pb, audio, sample_rate, True))
        except Exception as err:  # this request fails; the rest of the batch does not
            return pb.InferenceResponse(error=pb.TritonError(error_message(err)))

    def _synthesize(self, request):
        arrived = time.perf_counter()
        self.metrics.inflight.increment(1)
        try:
            req = read_request(pb, request, self.voice, priority="bulk")
            audio = self.engine.synthesize(req.text, req.rate)
            self.metrics.ttfa.observe(time.perf_counter() - arrived)
            self.metrics.audio_seconds.increment(len(audio) / self.engine.sample_rate)
            return pb.InferenceResponse(
                output_tensors=outputs(pb, audio, self.engine.sample_rate, True)
            )
        except Exception as err:  # this request fails; the rest of the batch does not
            return pb.InferenceResponse(error=pb.TritonError(error_message(err)))
        finally:
            self.metrics.inflight.increment(-1)
