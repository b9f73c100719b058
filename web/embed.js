// The one-line embed: <script src="https://TALLY/embed.js" data-tally-poll="POLL_ID" async></script>
// puts the poll's embed page (/embed/POLL_ID) in an iframe where the script tag stands,
// and keeps the iframe as tall as the page inside it says it is (postMessage
// {type: 'tally:embed-size'} from that page's origin and window only).
(function () {
  var script = document.currentScript;
  if (!script || !script.dataset.tallyPoll) return;
  var origin = new URL(script.src).origin;
  var id = script.dataset.tallyPoll;
  var frame = document.createElement('iframe');
  frame.src = origin + '/embed/' + encodeURIComponent(id);
  frame.title = script.dataset.tallyTitle || 'Poll';
  frame.loading = 'lazy';
  frame.style.cssText = 'border:0;width:100%;max-width:' + (script.dataset.tallyWidth || '560') + 'px;height:420px;display:block';
  frame.setAttribute('data-tally-poll', id);
  window.addEventListener('message', function (e) {
    if (e.origin !== origin || e.source !== frame.contentWindow) return;
    var d = e.data;
    if (!d || d.type !== 'tally:embed-size' || typeof d.height !== 'number') return;
    frame.style.height = Math.max(120, Math.min(4000, Math.ceil(d.height))) + 'px';
  });
  script.parentNode.insertBefore(frame, script.nextSibling);
})();
