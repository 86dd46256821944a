"""The chat page `jaxlm.server` serves at `/`: one HTML file whose script streams each reply
from `/v1/chat/completions` (fetch, reading the server-sent events as they arrive)."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>jaxlm chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 48rem; margin: 1rem auto; }
  #log .message { white-space: pre-wrap; padding: 0.5rem; margin: 0.25rem 0; border-radius: 4px; }
  #log .user { background: #e8f0fe; }
  #log .assistant { background: #f1f3f4; }
  #log .error { background: #fce8e6; }
  #form { display: flex; gap: 0.5rem; } #input { flex: 1; }
  #settings { margin-top: 0.5rem; font-size: 0.9rem; }
</style>
</head>
<body>
<div id="log"></div>
<form id="form">
  <textarea id="input" rows="2" placeholder="Enter sends, Shift+Enter a new line"></textarea>
  <button id="send" type="submit">Send</button>
</form>
<div id="settings">
  system <input id="system" size="30">
  temperature <input id="temperature" type="number" value="0.7" min="0" max="2" step="0.1">
  max tokens <input id="max_tokens" type="number" value="128" min="1">
  <button id="reset" type="button">New chat</button>
</div>
<script>
const messages = [];
const $ = (id) => document.getElementById(id);

function show(role, text) {
  const div = document.createElement('div');
  div.className = 'message ' + role;
  div.textContent = text;
  $('log').appendChild(div);
  return div;
}

async function send(text) {
  messages.push({role: 'user', content: text});
  show('user', text);
  const reply = show('assistant', '');
  const system = $('system').value.trim();
  const body = {
    messages: (system ? [{role: 'system', content: system}] : []).concat(messages),
    stream: true, temperature: Number($('temperature').value),
    max_tokens: Number($('max_tokens').value)};
  try {
    const response = await fetch('/v1/chat/completions', {
      method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify(body)});
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf('\\n\\n')) >= 0) {
        const data = buffer.slice(0, end).replace(/^data: /, '');
        buffer = buffer.slice(end + 2);
        if (data === '[DONE]') continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        reply.textContent += chunk.choices[0].delta.content || '';
      }
    }
    messages.push({role: 'assistant', content: reply.textContent});
  } catch (error) {
    messages.pop();  // the turn failed: leave it out of the conversation
    reply.className = 'message error';
    reply.textContent = String(error.message || error);
  }
  reply.classList.add('done');
}

$('form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const text = $('input').value.trim();
  if (!text || $('send').disabled) return;
  $('input').value = '';
  $('send').disabled = true;
  await send(text);
  $('send').disabled = false;
});
$('input').addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey) {
    event.preventDefault();
    $('form').requestSubmit();
  }
});
$('reset').addEventListener('click', () => {
  messages.length = 0;
  $('log').replaceChildren();
});
</script>
</body>
</html>
"""
