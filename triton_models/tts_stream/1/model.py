"""Streaming TTS (decoupled): one response per chunk of audio, as soon as it is made
(a chunk of frames with the chunked engine, a sentence with the sentence engine)."""

import json
import time

import triton_python_backend_utils as pb

from ttsfleet.serving.backend import Metrics, load, outputs, read_request
from ttsfleet.serving.engine import RequestError


class TritonPythonModel:
    def initialize(self, args):
        self.engine, name = load(pb, args)
        if not pb.using_decoupled_model_transaction_policy(json.loads(args["model_config"])):
            raise pb.TritonModelException(f"{name} must be decoupled")
        self.metrics = Metrics(pb, name)

    def execute(self, requests):
        for request in requests:
            arrived = time.perf_counter()
            sender = request.get_response_sender()
            self.metrics.inflight.increment(1)
            try:
                req = read_request(pb, request, self.engine.voice_name)
                first = True
                # A cancelled request (the client went, or barged in) stops at the next chunk.
                for audio in self.engine.chunks(req.text, req.rate, request.is_cancelled):
                    sender.send(
                        pb.InferenceResponse(
                            output_tensors=outputs(pb, audio, self.engine.sample_rate, False)
                        )
                    )
                    if first:
                        self.metrics.ttfa.observe(time.perf_counter() - arrived)
                        first = False
                    self.metrics.audio_seconds.increment(len(audio) / self.engine.sample_rate)
                sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as err:  # the stream must always end, with the reason
                message = str(err) if isinstance(err, RequestError) else f"synthesis failed: {err}"
                try:
                    sender.send(
                        pb.InferenceResponse(error=pb.TritonError(message)),
                        flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                    )
                except Exception:  # the client is gone (cancelled): nothing to tell
                    pb.Logger.log_warn(f"could not send the error: {message}")
            finally:
                self.metrics.inflight.increment(-1)
