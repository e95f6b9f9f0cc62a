from ttsfleet.cli import app

app()
